"""vLLM's metric names on /metrics (issue 19, item 3), scraped with prometheus_client's own text parser: the names,
types, labels and buckets vLLM's dashboard and autoscalers read, with values that follow the requests served."""

from __future__ import annotations

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from switchboard.serving.vllm_metrics import REQUEST_LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, buckets_1_2_5

from .conftest import MAX_MODEL_LEN

# name -> type, as vLLM v1 declares them (vllm/v1/metrics/loggers.py)
VLLM = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_params_n": "histogram",
    "vllm:request_params_max_tokens": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


def scrape(http: httpx.Client) -> dict[str, tuple[str, list[Sample]]]:
    resp = http.get("/metrics")
    assert resp.status_code == 200
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(resp.text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def buckets(samples: list[Sample], name: str) -> list[float]:
    return [float(s.labels["le"]) for s in samples if s.name == name + "_bucket" and s.labels["le"] != "+Inf"]


def test_vllm_names_types_labels_and_buckets(http: httpx.Client, client: openai.OpenAI, model_name: str) -> None:
    before = scrape(http)
    resp = client.completions.create(
        model=model_name, prompt=["a b", "c d e"], max_tokens=5, n=2, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert resp.usage.completion_tokens == 20
    after = scrape(http)
    for name, kind in VLLM.items():
        assert name in after, name
        assert after[name][0] == kind, name
        for sample in after[name][1]:
            assert sample.labels["model_name"] == model_name and sample.labels["engine"] == "0", sample
    _, samples = after["vllm:time_to_first_token_seconds"]
    assert buckets(samples, "vllm:time_to_first_token_seconds") == list(TTFT_BUCKETS)
    assert buckets(after["vllm:time_per_output_token_seconds"][1], "vllm:time_per_output_token_seconds") == list(
        TPOT_BUCKETS
    )
    e2e = "vllm:e2e_request_latency_seconds"
    assert buckets(after[e2e][1], e2e) == list(REQUEST_LATENCY_BUCKETS)
    lengths = buckets(after["vllm:request_prompt_tokens"][1], "vllm:request_prompt_tokens")
    assert lengths == buckets_1_2_5(MAX_MODEL_LEN) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]

    def delta(family: str, sample: str, **labels: str) -> float:
        return value(after[family][1], sample, **labels) - value(before[family][1], sample, **labels)

    # Two prompts x n=2: four requests in vLLM's sense, each 5 tokens, finished by length.
    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == 20
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 4
    assert delta("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 4
    assert delta("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == 20
    assert delta("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 2  # per prompt
    assert delta("vllm:time_per_output_token_seconds", "vllm:time_per_output_token_seconds_count") == 16  # 4 x 4
    assert delta("vllm:request_params_n", "vllm:request_params_n_sum") == 4  # n=2 for each of two prompts
    assert delta("vllm:request_params_max_tokens", "vllm:request_params_max_tokens_sum") == 10
    assert 0 <= value(after["vllm:kv_cache_usage_perc"][1], "vllm:kv_cache_usage_perc") <= 1
    assert value(after["vllm:num_requests_running"][1], "vllm:num_requests_running") == 0
    # Ours stay beside them.
    assert "switchboard_time_to_first_token_seconds" in after
