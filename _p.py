import sys, time, torch
from benchmarks.common import load_config
from model.transformer import build_model
cfg = load_config(["experiment=v4", "model.attn.indexer_warmup_steps=0"]+sys.argv[1:])
m = build_model(cfg.model, 512)
for a in m.modules():
    if type(a).__name__=="V4Attention": a.sparse=True
m.train()
ids = torch.randint(0,512,(16,257))
def step():
    loss = m(ids[:, :-1], ids[:, 1:]); loss.backward()
for _ in range(3): step()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
    step(); step(); step()
ev = p.events()
for e in ev:
    if e.name in ("aten::fill_", "aten::_softmax_backward_data") and e.input_shapes and e.input_shapes[0]==[16,256,4,145]:
        par = e.cpu_parent
        chain=[]
        while par is not None and len(chain)<3:
            chain.append(par.name); par = par.cpu_parent
        print(f"{e.name:30s} {e.cpu_time_total/1e3:7.2f}ms thread {e.thread} {chain}")
