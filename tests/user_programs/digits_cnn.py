# A device developer's program: a small CNN of its own on scikit-learn's digits, enrolled for verifiable
# unlearning through the one-call client. Run as: python digits_cnn.py ADDRESS PROVIDER_KEY STATE_DIR
import json
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from zkunlearn.client import EdgeDevice

address, provider_key, state_dir = sys.argv[1:4]
digits = load_digits()
x, y = torch.tensor(digits.images[:, None] / 16, dtype=torch.float32), torch.tensor(digits.target)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 2, 4, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(50, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
for _ in range(60):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x[:1500]), y[:1500]).backward()
    optimizer.step()


def accuracy(info: object) -> None:  # held-out accuracy, before a request is applied and after
    print(f"{type(info).__name__}: accuracy {(model(x[1500:]).argmax(1) == y[1500:]).float().mean():.3f}")


device = EdgeDevice.connect(
    address, "digits-cnn", provider_key=provider_key, state_dir=state_dir, allow_insecure_srs=True
)
device.enroll_model(model, ["0.weight"], x[:300], y[:300], nn.functional.cross_entropy)
outcomes = device.run(max_requests=1, on_request=accuracy, on_applied=accuracy)
print("outcomes:", [o.status for o in outcomes], "log size:", device.verify_log())
Path(state_dir, "known_head.json").write_text(json.dumps(device.known_head()))
