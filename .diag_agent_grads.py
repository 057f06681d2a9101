import os; os.environ["TRITON_INTERPRET"]="1"
import torch, math
from visattn.ops import AgentBias, agent_attention, agent_attention_ref
from tests.ops._agent_utils import random_bias_params
grid, agent_shape, P, r, H, D = ((7, 9), (3, 3), 0, 1, 2, 32)
import sys; B=int(sys.argv[1]); dtype=torch.float32
g = torch.Generator(device="cpu").manual_seed(0)
N=P+63
q,k,v=(torch.randn(B,N,H,D,generator=g) for _ in range(3))
torch.manual_seed(0)
d = random_bias_params(H, 9, grid, grid, prefix=P, dtype=torch.float32)
grads={}
for name in ("triton","ref"):
    ts=[t.detach().clone().requires_grad_() for t in (q,k,v)]
    ps={n:t.detach().clone().requires_grad_() for n,t in d.items()}
    kw=dict(agent_shape=agent_shape, grid=grid, bias=AgentBias(**ps))
    out = agent_attention_ref(*ts, upcast=True, **kw) if name=="ref" else agent_attention(*ts, backend=name, **kw)
    torch.manual_seed(1)
    out.float().mul(torch.randn_like(out, dtype=torch.float32)).sum().backward()
    grads[name]=[t.grad.double() for t in ts]+[ps[n].grad.double() for n in sorted(ps)]
for name in ("triton",):
    print(name, ["%.1e"%(a-b).abs().max().item() for a,b in zip(grads[name],grads["ref"])])
