"""The server as a Ray Serve deployment (serve/replicas.py): two replicas of the shipped Sudoku model on a local Ray
instance, behind Serve's proxy on a loopback port, answering as one server does."""

import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from dgemma.runtime.pipeline import Pipeline
from dgemma.serve.replicas import build_app
from dgemma.sudoku.solve import shipped

if not sys.platform.startswith("linux"):
    pytest.skip("the test extra installs ray on Linux only", allow_module_level=True)

# Ray's own modules warn about pydantic APIs they use; they import in the fixture, under this filter.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NAME = "sudoku-4x4"
PUZZLES = ["0024000000020300", "1000000200030004", "0000000000000000", "1200340000000000"]


@pytest.fixture(scope="module")
def url():
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"replicas": 2, "max_batch": 4}), name="dgemma", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_as_one_server(url):
    from ray import serve

    status = serve.status().applications["dgemma"].deployments["dgemma"]
    assert status.replica_states == {"RUNNING": 2}
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    requests = [(PUZZLES[i % len(PUZZLES)], i) for i in range(8)]

    def run(request):
        puzzle, seed = request
        stream = seed % 2 == 0
        out = client.completions.create(model=NAME, prompt=f"<bos>{puzzle}<sep>", seed=seed, stream=stream)
        return "".join(c.choices[0].text for c in out if c.choices) if stream else out.choices[0].text

    with ThreadPoolExecutor(len(requests)) as pool:
        texts = list(pool.map(run, requests))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica runs
    try:
        pipe = Pipeline.from_pretrained(shipped(4), dtype=torch.float32)
        for (puzzle, seed), text in zip(requests, texts, strict=True):
            assert text == pipe.generate(f"<bos>{puzzle}<sep>", chat=False, seed=seed).text
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="other", prompt="x")
    assert refused.value.code == "model_not_found"
