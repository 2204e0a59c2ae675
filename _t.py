import sys, time, torch, statistics
from benchmarks.common import load_config
from model.transformer import build_model
def measure(ov):
    cfg = load_config(ov)
    m = build_model(cfg.model, 512)
    for a in m.modules():
        if type(a).__name__=="V4Attention": a.sparse=True
    m.train()
    ids = torch.randint(0,512,(16,257))
    def step():
        loss = m(ids[:, :-1], ids[:, 1:]); loss.backward()
    for i in range(3): step()
    ts=[]
    for i in range(6):
        t=time.perf_counter(); step(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
base=["experiment=v4", "model.attn.indexer_warmup_steps=0"]
for name, ov in [("dense small", ["model=small"]), ("v4", base), ("v4 residual", base+["model.residual=residual"]),
                 ("v4 ffn dense", base+["model.ffn=dense"]), ("v4 attn std", base+["model.attention=standard"]),
                 ("v4 mtp0", base+["model.mtp_depth=0"])]:
    try: print(f"{name:15s} {measure(ov):.0f} ms", flush=True)
    except Exception as e: print(name, "ERR", str(e)[:200])
