"""Generates tests/data/torchvision_reference.json with real torchvision (run in a venv that has it)."""
import json, math, sys
import torch, torchvision
from torchvision import models

def fill(model):
    sd = model.state_dict()
    for i, k in enumerate(sorted(sd)):
        t = sd[k]
        if not t.is_floating_point():
            t.zero_(); continue
        n = t.numel()
        base = torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + i).to(t.dtype).reshape(t.shape)
        if k.endswith("running_var"):
            t.copy_(1.0 + 0.1 * base * base)
        elif k.endswith("running_mean"):
            t.copy_(0.05 * base)
        elif t.dim() > 1:
            fan_in = n // t.shape[0]
            t.copy_(base * math.sqrt(3.0 / fan_in))
        else:
            t.copy_(0.1 * base + (1.0 if k.endswith("weight") else 0.0))
    return model

out = {"torchvision": torchvision.__version__, "torch": torch.__version__, "input": "sin(arange(1*3*64*64)*0.01), shape 1x3x64x64", "models": {}}
x = torch.sin(torch.arange(3 * 64 * 64, dtype=torch.float32) * 0.01).reshape(1, 3, 64, 64)
for name in ["resnet18", "resnet34", "vgg11", "mobilenet_v2", "shufflenet_v2_x1_0"]:
    m = fill(getattr(models, name)()).eval()
    with torch.no_grad():
        y = m(x)[0]
    out["models"][name] = {
        "keys": {k: list(v.shape) for k, v in m.state_dict().items()},
        "logits": [round(float(v), 7) for v in y],
    }
    print(name, y[:3], file=sys.stderr)
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=0, sort_keys=True)
