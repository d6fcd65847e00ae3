"""Why a capture session's compiled generate() calls record CUDA graphs anew: cudagraph trees' debug log.

Three plain compiled calls, then (logged) a fourth, then two capture sessions of ``calls`` calls, each
followed by two plain calls. Usage and the summary the README quotes (H200, PyTorch 2.11, transformers
5.17; ``bench/results/gpu-cudagraph-log-qwen3-b8.txt``):

    python bench/gpu_cudagraph_log.py qwen3 12 16 8 4 > why.log 2>&1
    awk '/^===/{print $0, "| refused:", rr, "recordings:", r; rr=0; r=0; next}
         /^\[.*Re-recording/{rr++} /^\[.*\] Recording function/{r++}' why.log

Arguments: model (qwen3 or deepseek), layers, new tokens, batch, calls per capture session. A
"Re-recording ... reason=static input data pointer changed" line is a recorded graph refused for a
step (another is tried, or one is recorded); "Recording function" is a recording.
"""
import sys, time, tempfile, logging
from pathlib import Path
sys.path.insert(0, "bench")
import torch
from gpu_capture import build
import moeprof
from transformers.generation.configuration_utils import CompileConfig
name, layers, new, batch, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = build(name, layers, "grouped_mm" if name == "deepseek" else None)
g = torch.Generator().manual_seed(1)
ids = torch.randint(10, 1000, (batch, 64), generator=g).cuda()
kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
          pad_token_id=0, cache_implementation="static", compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead"))
def gen(tag):
    torch.cuda.synchronize(); t = time.perf_counter(); model.generate(**kw); torch.cuda.synchronize()
    print(f"=== {tag}: {1e3*(time.perf_counter()-t):.0f} ms", flush=True)
for i in range(3):
    gen(f"plain {i}")
tmp = Path(tempfile.mkdtemp())
torch._logging.set_logs(cudagraphs=True, recompiles=True)
lg = logging.getLogger("torch._inductor.cudagraph_trees"); lg.setLevel(logging.DEBUG); h = logging.StreamHandler(sys.stdout); lg.addHandler(h); lg.propagate = False
gen("plain 3 (logged)")
for s in range(2):
    rec = moeprof.capture(model, tmp / f"c{s}", force=True, eos_token_id=None).start()
    for c in range(calls):
        gen(f"session {s} call {c}")
    rec._pipe.drain(); rec.close()
    gen(f"plain after session {s}")
    gen(f"plain after session {s} again")
