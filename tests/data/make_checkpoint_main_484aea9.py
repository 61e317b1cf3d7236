"""Run inside a checkout of main at 484aea9: a C2F+CMD tiny model (every part) as its code saves it."""
import sys, torch, os
sys.path.insert(0, "tests")
from omegaconf import OmegaConf
from cmd_plugin.tiny_encoders import make_tiny_clip, make_tiny_hubert
from test_model import build_model, make_batch, criterion
out = sys.argv[1]
root = "/tmp/oldckpt_enc"; os.makedirs(root, exist_ok=True)
hubert = make_tiny_hubert(f"{root}/tiny_hubert.pt", seed=0)
name, config, weights = make_tiny_clip(f"{root}/tiny_clip", seed=0)
enc = {"hubert_path": hubert, "image_model": name, "image_model_config": config, "image_pretrained": weights}
torch.manual_seed(0)
model = build_model(enc, c2f_momentum=True, momentum=0.9, queue_size=10, multimodal_layers=1, multimodal_heads=2,
                    multimodal_ffn_dim=32, multimodal_dropout=0.0, speech_encoder_heads=2, speech_encoder_ffn_dim=64)
crit = criterion(sim_weight=1.0, distill_alpha=0.4, distill_ramp_updates=0, cmd_weight=1.0)
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for u in range(2):
    model.train(); model.set_num_updates(u); crit.set_update_num(u)
    loss, n, _ = crit(model, make_batch([0, 0, 1, 2], seed=u))
    opt.zero_grad(); (loss / n).backward(); opt.step()
model.set_num_updates(2)
model.eval()
batch = make_batch([0, 1, 2], seed=7)["net_input"]
with torch.no_grad():
    o = model(**batch)
    tok = torch.cat([o["image"][:, None], o["patches"]], dim=1)
    logits = model.match_logits(o["speech_seq"], o["speech_mask"], tok)
    recon = model.fusion(o["speech"], o["patches"], all_pairs=False)
cfg = OmegaConf.to_container(OmegaConf.structured(model.cfg), resolve=True, enum_to_str=True)
for k in ("hubert_path", "image_pretrained", "image_model_config"):
    cfg[k] = "/moved/away/" + os.path.basename(cfg[k])
state = {"cfg": {"model": cfg}, "model": model.state_dict(),
         "expected": {"speech": o["speech"], "image": o["image"], "match_logits": logits, "fusion": recon},
         "written_by": "cmd_plugin main 484aea9 (tests/data/README.md)"}
torch.save(state, out)
print(sorted(k.split(".")[0] for k in state["model"]), os.path.getsize(out))
