"""Quick GPU correctness check of the neighborhood kernels (dev script)."""
import sys, time, torch
from visattn.ops import neighborhood_attention as na, neighborhood_attention_ref as ref
torch.manual_seed(0)
def check(size, ks, dtype=torch.bfloat16, H=4, Hk=4, D=64, B=2, **kw):
    q=torch.randn(B,*size,H,D,device="cuda",dtype=dtype,requires_grad=True)
    k=torch.randn(B,*size,Hk,D,device="cuda",dtype=dtype,requires_grad=True)
    v=torch.randn(B,*size,Hk,D,device="cuda",dtype=dtype,requires_grad=True)
    r=None
    if kw.pop("rpb", False):
        r=torch.randn(H,*[2*x-1 for x in ks],device="cuda",dtype=torch.float32,requires_grad=True)
    t=time.time()
    o,l=na(q,k,v,ks,rpb=r,return_lse=True,backend="triton",**kw)
    o2,l2=ref(q,k,v,ks,rpb=r,return_lse=True,**kw)
    o3=ref(q,k,v,ks,rpb=r,upcast=False,**kw)
    g=torch.randn_like(o)
    ins=[q,k,v]+([r] if r is not None else [])
    a=torch.autograd.grad((o*g).sum(),ins); b=torch.autograd.grad((o2*g).sum(),ins); c=torch.autograd.grad((o3*g).sum(),ins)
    torch.cuda.synchronize()
    e=lambda x,y:(x.float()-y.float()).abs().max().item()
    res=[e(o,o2), e(o3,o2)]+[f"{e(x,y):.2e}/{e(z,y):.2e}" for x,y,z in zip(a,b,c)]
    print(size,ks,kw,dtype,"out err %.2e (ref-lowp %.2e)"%tuple(res[:2]),"grads",res[2:],"lse %.2e"%e(l,l2),"%.1fs"%(time.time()-t),flush=True)
check((56,56),(7,7),D=32)
check((56,56),(7,7),D=32,dilation=8,rpb=True)
check((33,37),(13,9),stride=(4,3),dilation=(2,1),D=128)
check((20,24),(5,7),is_causal=(True,False),D=64,H=8,Hk=2)
check((8,12,16),(3,5,7),is_causal=(True,False,False),D=128)
check((8,12,16),(3,5,7),dtype=torch.float16,D=80)
check((300,),(31,),dtype=torch.float32,D=64)
