"""What capture sessions cost a compiled model around them: re-traces, CUDA-graph recordings, memory.

Three plain compiled calls, then (logged) a fourth, then ``sessions`` capture sessions of ``calls`` calls,
each followed by two plain calls. Every generate() call prints one line: its time, the CUDA graphs
cudagraph trees recorded in it, the recorded graphs it refused (one line of their log per refusal),
the frames dynamo compiled, and the GPU memory allocated and reserved after it; each session's rows
are checked. At the end: why graphs were refused, by reason and input name, with counts, and the
line of the model that made each input.

    python bench/gpu_cudagraph_log.py qwen3 12 16 8 4 [sessions=2] [log file]

Arguments: model (qwen3 or deepseek), layers, new tokens, batch, calls per capture session, capture
sessions, and a file for cudagraph trees' whole debug log. Run an older tree with ``PYTHONPATH``.
H200, PyTorch 2.11, transformers 5.17: ``bench/results/gpu-cudagraph-log-qwen3-b8.txt`` (tree 71a4387) and
``bench/results/capture-own-call-h200.txt`` (this capture against 3df24df): every refusal names the
static KV cache, which transformers allocates anew in every generate() call.
"""
import logging
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an older tree can be timed
import torch
from torch._dynamo.utils import counters
from transformers.generation.configuration_utils import CompileConfig

import moeprof
from gpu_capture import build

name, layers, new, batch, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sessions = int(sys.argv[6]) if len(sys.argv) > 6 else 2
log_file = open(sys.argv[7], "w") if len(sys.argv) > 7 else None
print("moeprof from", Path(moeprof.__file__).parent, "| torch", torch.__version__, "|", torch.cuda.get_device_name(), flush=True)
model = build(name, layers, "grouped_mm" if name == "deepseek" else None)
g = torch.Generator().manual_seed(1)
ids = torch.randint(10, min(1000, model.config.vocab_size), (batch, 64), generator=g).cuda()
kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
          pad_token_id=0, cache_implementation="static", compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead"))


class Tally(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.recorded = self.refused = 0
        self.reasons: Counter = Counter()
        self.where: dict[str, str] = {}  # input name -> the innermost frame of its stack trace

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if log_file:
            log_file.write(msg + "\n")
        if "Re-recording" in msg:
            self.refused += 1
            why = msg.split("reason=", 1)[-1].split(".", 1)[0]
            names = re.findall(r"input name: (\S+)\.", msg)
            self.reasons[(phase, why, ",".join(names[:4]))] += 1
            for name, trace in re.findall(r"input name: (\S+)\..*?input stack trace:(.*?)(?=\ninput name:|\Z)", msg, re.S):
                lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
                self.where.setdefault(name, " | ".join(lines[-2:]))
        elif "] Recording function" in msg:
            self.recorded += 1


tally = Tally()
phase = "plain"


def gen(tag: str, rec=None) -> None:
    global phase
    phase = "capture" if rec is not None else "plain"
    tally.recorded = tally.refused = 0
    frames = counters["frames"]["ok"]
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(**kw)
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t)
    print(f"=== {tag}: {ms:.0f} ms | recorded {tally.recorded} refused {tally.refused} | frames compiled "
          f"{counters['frames']['ok'] - frames} | GiB allocated {torch.cuda.memory_allocated() / 2**30:.2f} "
          f"reserved {torch.cuda.memory_reserved() / 2**30:.2f}", flush=True)


for i in range(3):
    gen(f"plain {i}")
tmp = Path(tempfile.mkdtemp())
torch._logging.set_logs(recompiles=True)
lg = logging.getLogger("torch._inductor.cudagraph_trees")
lg.setLevel(logging.DEBUG)
lg.addHandler(tally)
lg.propagate = False
gen("plain 3 (logged)")
for s in range(sessions):
    rec = moeprof.capture(model, tmp / f"c{s}", force=True, eos_token_id=None).start()
    for c in range(calls):
        gen(f"session {s} call {c}", rec)
    rec.close()
    expected = len(rec.layout.points) * batch * (64 + new - 1) * calls
    print(f"session {s}: {rec.rows} rows recorded, {expected} expected", flush=True)
    if rec.rows != expected:
        raise SystemExit("wrong row count")
    gen(f"plain after session {s}")
    gen(f"plain after session {s} again")
print("refusals by calls (plain or capture), reason and input:")
for (where, why, names), n in tally.reasons.most_common():
    print(f"  {n:5d}  {where:7s}  {why}  {names}")
print("where those inputs come from (innermost frame):")
for input_name, frame in tally.where.items():
    print(f"  {input_name}: {frame[-300:]}")
