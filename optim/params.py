"""Classify a model's parameters by the role they play, from module types rather than names.

Roles: `matrix` (hidden ≥2-D weights: what Muon orthogonalises), `embedding`, `head` (output
projection), `norm` (normalisation gains), `scalar` (biases and every other 0/1-D parameter).
A module can declare a parameter's role with `param.optim_role` (hyper-connection static biases
are 2-D but are biases, not weights).
"""
from __future__ import annotations

from torch import nn

ROLES = ("matrix", "embedding", "head", "norm", "scalar")
NORM_TYPES = (nn.RMSNorm, nn.LayerNorm)


def classify_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    head_ids = {id(p) for p in getattr(model, "output_parameters", lambda: [])()}
    roles: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if hasattr(p, "optim_role"):  # declared by its module (e.g. hyper-connection biases)
                role = p.optim_role
            elif isinstance(module, nn.Embedding):
                role = "embedding"
            elif id(p) in head_ids:
                role = "head"
            elif isinstance(module, NORM_TYPES):
                role = "norm"
            elif p.dim() >= 2:
                role = "matrix"
            else:
                role = "scalar"
            roles[role].append((name, p))
    return roles


def describe_groups(groups: list[dict]) -> str:
    """One line per optimizer group: its name, tensor count, parameter count and settings."""
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lr = f"  lr={g['lr']}" if "lr" in g else ""
        lines.append(f"{g['name']:<16} {len(g['params']):>4} tensors {n:>12,} params  wd={g['weight_decay']}{lr}")
    return "\n".join(lines)
