"""Where a served step's wall time goes under workload W: `python -m switchboard.bench.serve_profile --model DIR`.

Two views, as issue 16 asks:
- py-spy (`record --native --threads --idle`) on `switchboard serve` and on its engine core process while W runs
  over HTTP (base model, then 32 distinct LoRA adapters): every sample of the engine's loop thread (in the core
  process with `--engine-process on`, else the server's engine thread) and of the server's event loop is put in one
  category by the frames of its stack (Python and native), so the shares are shares of wall time, GIL waits and idle
  included;
- torch's profiler on the same model in this process (the step alone, no HTTP): the operators a step runs.

Writes bench-results/serve-profile.json and the raw py-spy stacks beside it; prints the tables that
docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from . import serve_client, serve_servers
from .serve import _uptime, prompts_for, stdlib_ids

ENGINE_THREAD = "switchboard-engine"  # the server's step thread (the default, --engine-process off)
CORE_THREAD = "engine-core-loop"  # the engine core process's step loop (serving/engine/core.py)
MAIN_THREAD = "MainThread"

# (category, substrings any of which in the stack puts a sample there); the first rule that matches wins.
ENGINE_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("idle: waiting for requests", ("_queue_SimpleQueue_get", "Poller.poll", "zmq_poll")),
    ("sampling", ("sampler.py", "sample (engine/isolation.py")),
    ("logits (lm_head product)", ("LlamaModel.logits",)),
    ("scheduling", ("scheduler.py", "block_manager.py")),
    ("batch metadata (ids, positions, slots, adapter segments)", ("ModelRunner.prepare", "StepBatches.batch")),
    ("adapter ops (LoRA shrink/expand)", ("AdapterBatch.add_output", "AdapterBatch.transform_input")),
    ("forward: oneDNN weight re-pack (copy_b)", ("copy_b",)),
    ("forward: attention", ("paged_attention", "rope (", "rope_ (")),  # step_ops.rope, cpu_step.rope_
    ("forward: linear products", ("AdapterLinear.forward",)),
    ("forward: norms, activations, embedding, residuals", ("LlamaModel.forward",)),
    ("detokenisation", ("detokenizer.py",)),
    ("post-processing (append, stop checks, outputs to the loop)", ("llm_engine.py", "async_engine.py", "core.py")),
]
LOOP_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("idle: waiting in epoll", ("select (selectors.py", "epoll_wait", "epoll_pwait")),  # asyncio's loop, uvloop's
    ("JSON and response chunks", ("json", "responses.py", "streaming.py", "pydantic")),
    ("engine outputs (channel, detokenisation, asyncio queues)", ("async_engine.py", "core_client.py", "output_proc")),
    ("request parsing, prompts, auth", ("body.py", "prompts.py", "resolve.py", "auth.py", "schemas.py")),
    # every stack starts in uvicorn's run(): its protocols, not its entry point, are HTTP work
    ("HTTP (uvicorn, h11/httptools, starlette)", ("uvicorn/protocols", "h11", "httptools", "starlette", "anyio")),
    ("event loop scheduling (asyncio, uvloop)", ("asyncio", "uv_run", "loop.c")),
]


GIL = ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "PyGILState_Ensure")
CONDITION_WAITS = ("pthread_cond_wait", "pthread_cond_timedwait", "pthread_cond_clockwait")
NATIVE_LIBS = ("libtorch", "libc10", "libgomp", "libstdc++", "libdnnl")


def gil_wait(frames: list[str]) -> bool:
    """A thread waiting to take the GIL back. CPython 3.11's take_gil is static (no symbol): it shows as a
    condition-variable wait called straight from the interpreter or a C module, while torch's own waits are called
    from libtorch or libgomp and Python's locks wait on semaphores, not condition variables."""
    inner = [f for f in frames if not f.startswith("0x")]  # unnamed libc frames
    if any(g in f for f in inner[-3:] for g in GIL):
        return True
    if len(inner) < 2 or not any(c in inner[-1] for c in CONDITION_WAITS):
        return False
    return not any(lib in inner[-2] for lib in NATIVE_LIBS)


def classify(stack: str, rules: list[tuple[str, tuple[str, ...]]]) -> str:
    """The category of one sampled stack: a GIL wait at its innermost frames, else the first matching rule."""
    if gil_wait(stack.split(";")):
        return "GIL wait"
    for name, needles in rules:
        if any(n in stack for n in needles):
            return name
    return "other"


WAITS = (
    "epoll_wait",
    "futex",
    "pthread_cond",
    "sem_",
    "select",
    "poll",
    "nanosleep",
    "_queue_SimpleQueue_get",
    "PyThread_acquire_lock",
)


def busy_samples(stacks: Counter[str]) -> int:
    """Samples of a thread not blocked in a wait (its innermost frames name none)."""
    return sum(n for s, n in stacks.items() if not any(w in ";".join(s.split(";")[-3:]) for w in WAITS))


def parse_raw(path: Path) -> dict[str, Counter[str]]:
    """py-spy's raw output (`thread (TID): NAME;frame;...;frame COUNT`) -> samples per stack, per thread name."""
    threads: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        head, _, frames = stack.partition(";")
        name = head.split(": ", 1)[1] if ": " in head else head
        threads.setdefault(name, Counter())[frames] += int(count)
    return threads


def breakdown(stacks: Counter[str], rules: list[tuple[str, tuple[str, ...]]]) -> dict[str, float]:
    """Share of the thread's samples (its wall time, with --idle) per category, largest first."""
    total = sum(stacks.values()) or 1
    out: Counter[str] = Counter()
    for stack, n in stacks.items():
        out[classify(stack, rules)] += n
    return {k: v / total for k, v in out.most_common()}


def record(pid: int, out: Path, rate: int) -> subprocess.Popen:
    exe = str(Path(sys.executable).with_name("py-spy"))
    cmd = [exe, "record", "--pid", str(pid), "--native", "--threads", "--idle", "--rate", str(rate)]
    cmd += ["--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_http(args: argparse.Namespace, workdir: Path) -> dict:
    from switchboard.serving.engine.llm_engine import load_tokenizer

    tok = load_tokenizer(args.model)
    ids, bos = stdlib_ids(tok), tok.bos_token_id
    loras = serve_servers.write_loras(args.model, workdir / "adapters", args.num_loras, args.lora_rank)
    server = serve_servers.ours(args.model, workdir, loras, args.dtype, engine_process=args.engine_process == "on")
    server.start()
    assert server.proc is not None
    results: dict[str, dict] = {}
    run_index = 1000  # other prompts than bench-serve's
    try:
        for label, models in (("base", [server.model_name]), (f"{args.num_loras} LoRA", list(loras))):
            prompts = prompts_for(ids, bos, args.num_requests, args.prompt_len, run_index)
            run_index += 1
            _http_run_sync(server.url, models, prompts, args.max_tokens)  # warm-up
            raw = args.out.parent / f"serve-profile-{label.replace(' ', '-')}.raw.txt"
            core = _core_pid(server.proc.pid)
            raw_core = raw.with_name(raw.name.replace(".raw.txt", "-core.raw.txt"))
            spies = [record(server.proc.pid, raw, args.rate)]
            if core is not None:
                spies.append(record(core, raw_core, args.rate))
            time.sleep(1.0)  # py-spy attaches
            walls, tokens = [], 0
            for _ in range(args.rounds):
                prompts = prompts_for(ids, bos, args.num_requests, args.prompt_len, run_index)
                run_index += 1
                r = _http_run_sync(server.url, models, prompts, args.max_tokens)
                walls.append(r["wall_s"])
                tokens += r["tokens"]
            for spy, path in zip(spies, (raw, raw_core), strict=False):
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
                _, err = spy.communicate(timeout=120)
                if not path.exists():
                    raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
            threads = _threads(raw, raw_core if core is not None else None)
            steps = args.rounds * args.max_tokens  # one prefill step and max_tokens - 1 decode steps per run
            engine_s = sum(threads.get(ENGINE_THREAD, Counter()).values()) / args.rate
            results[label] = {
                "engine_process": core is not None,
                "tok_s": tokens / sum(walls),
                "wall_s": sum(walls),
                "steps_about": steps,
                "engine_thread_s": engine_s,
                "engine": breakdown(threads.get(ENGINE_THREAD, Counter()), ENGINE_RULES),
                "event_loop": breakdown(threads.get(MAIN_THREAD, Counter()), LOOP_RULES),
                "other_threads_busy_s": {
                    name: busy_samples(st) / args.rate
                    for name, st in threads.items()
                    if name not in (ENGINE_THREAD, MAIN_THREAD)
                },
                "raw": str(raw),
                "raw_core": str(raw_core) if core is not None else None,
                "uptime": _uptime(),
            }
    finally:
        server.stop()
    return results


def _core_pid(server_pid: int) -> int | None:
    """The server's engine core process (multiprocessing's spawned child); None without --engine-process on."""
    import psutil  # with py-spy, in the test extra

    for child in psutil.Process(server_pid).children():
        if "spawn_main" in " ".join(child.cmdline()):
            return child.pid
    return None


def _threads(raw: Path, raw_core: Path | None) -> dict[str, Counter[str]]:
    """Samples per thread name: the server's threads, and the core's step loop as the engine thread."""
    threads = parse_raw(raw)
    if raw_core is not None:
        core = parse_raw(raw_core)
        threads[ENGINE_THREAD] = core.get(CORE_THREAD, Counter())
        for name, stacks in core.items():
            if name != CORE_THREAD:
                threads[f"core: {name}"] = stacks
    return threads


def _http_run_sync(url: str, models: list[str], prompts: list[list[int]], max_tokens: int) -> dict:
    import asyncio

    return asyncio.run(serve_client.run(url, models, prompts, max_tokens))


def profile_torch(args: argparse.Namespace) -> str:
    """torch's profiler over one W run of the engine in this process: the operators by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from switchboard.serving.config import ServeConfig
    from switchboard.serving.engine.llm_engine import LLMEngine
    from switchboard.serving.engine.request import SamplingParams

    engine = LLMEngine(ServeConfig(model=args.model, dtype=args.dtype, max_num_seqs=64))
    ids, bos = stdlib_ids(engine.tokenizer), engine.tokenizer.bos_token_id
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts_for(ids, bos, args.num_requests, args.prompt_len, 2000), params)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(prompts_for(ids, bos, args.num_requests, args.prompt_len, 2001), params)
    del torch
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50)


def print_breakdown(results: dict) -> None:
    for label, r in results.items():
        ms_per_step = r["engine_thread_s"] * 1e3 / r["steps_about"]
        print(
            f"\n### {label}: {r['tok_s']:.0f} generated tok/s over HTTP, {r['wall_s']:.1f} s, about "
            f"{ms_per_step:.1f} ms of engine-thread wall time per step ({r['uptime']})\n"
        )
        print("| engine thread | share of wall | ms per step |")
        print("|---|---:|---:|")
        for k, v in r["engine"].items():
            print(f"| {k} | {v:.1%} | {v * ms_per_step:.2f} |")
        print("\n| event loop (main thread) | share of wall |")
        print("|---|---:|")
        for k, v in r["event_loop"].items():
            print(f"| {k} | {v:.1%} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path(".cache/models/smollm2-135m"))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-loras", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="W runs recorded per workload")
    p.add_argument("--engine-process", choices=["on", "off"], default="off", help="the server's --engine-process")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip torch's profiler of the step")
    p.add_argument("--out", type=Path, default=Path("bench-results/serve-profile.json"))
    p.add_argument("--from-raw", action="store_true", help="re-attribute the raw stacks of the last run (--out)")
    args = p.parse_args(argv)
    if args.from_raw:
        report = json.loads(args.out.read_text())
        for r in report["http"].values():
            threads = _threads(Path(r["raw"]), Path(r["raw_core"]) if r.get("raw_core") else None)
            r["engine"] = breakdown(threads.get(ENGINE_THREAD, Counter()), ENGINE_RULES)
            r["event_loop"] = breakdown(threads.get(MAIN_THREAD, Counter()), LOOP_RULES)
        print_breakdown(report["http"])
        args.out.write_text(json.dumps(report, indent=2))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[serve-profile] {_uptime()}", flush=True)
    results = profile_http(args, args.out.parent / "serve-profile-work")
    print_breakdown(results)
    report: dict[str, object] = {"http": results}
    args.out.write_text(json.dumps(report, indent=2))  # kept if the torch part is interrupted
    if args.torch:
        table = profile_torch(args)
        print("\n### torch profiler, one W run in process (self CPU time)\n")
        print(table)
        report["torch_table"] = table
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
