"""`dgemma serve --model DIR --api-key KEY` with a checkpoint that has the chat format (the tiny test checkpoint):
chat completions, streamed and not, equal to `Pipeline.generate` of the same messages; max_tokens, stop strings and
temperature as documented; the chat-only refusals; the key."""

import json

import openai
import pytest
import torch

from dgemma.cli import parser
from dgemma.serve.cli import load_service

from serving import LiveServer, events

KEY = "test-key"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
FAST = {"max_denoising_steps": 4}  # a few steps per canvas keep the tests quick


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = parser().parse_args(["serve", "--model", str(tiny_checkpoint), "--dtype", "fp32", "--name", "tiny"])
    live = LiveServer(load_service(args), api_key=KEY)
    yield live
    live.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def alone(server, messages=MESSAGES, **kwargs):
    return server.service.pipe.generate(messages, **kwargs)


def test_chat_equals_pipeline_generate(server, client):
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, seed=4, max_tokens=24, extra_body=FAST | {"return_token_ids": True}
    )
    ref = alone(server, seed=4, max_new_tokens=24, **FAST)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.token_ids == ref.tokens[0][:24] and out.object == "chat.completion"
    assert out.prompt_token_ids == server.service.pipe.prompt_ids(MESSAGES)[0]
    assert out.usage.prompt_tokens == len(out.prompt_token_ids) and out.usage.completion_tokens == len(choice.token_ids)


def test_thinking_developer_role_and_text_parts(server, client):
    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "user", "content": "Why is the sky blue?"}]  # fmt: skip
    out = client.chat.completions.create(
        model="tiny", messages=messages, seed=2, max_tokens=8, extra_body=FAST | {"thinking": True}
    )
    assert out.choices[0].message.content == alone(server, seed=2, max_new_tokens=8, thinking=True, **FAST).text


def test_stream_one_chunk_per_canvas(server, client):
    ref = alone(server, seed=6, max_new_tokens=24, **FAST)
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, seed=6, max_tokens=24, stream=True, stream_options={"include_usage": True},
        extra_body=FAST,
    )  # fmt: skip
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert len(content) == len(ref.stats.steps_per_canvas)  # one chunk per committed canvas
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])
    assert "".join(c.choices[0].delta.content for c in content) == ref.text
    stopped = ref.tokens[0][-1] in server.service.defaults.stop_ids
    assert chunks[-2].choices[0].finish_reason == ("stop" if stopped else "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.tokens[0])


def test_max_tokens_cuts_inside_a_canvas(server, client):
    ref = alone(server, seed=2, max_new_tokens=5, **FAST)
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, seed=2, max_completion_tokens=5,
        extra_body=FAST | {"return_token_ids": True},
    )  # fmt: skip
    assert len(ref.tokens[0]) == 8  # a whole canvas ran (no stop id in it); five of its tokens return
    assert out.choices[0].token_ids == ref.tokens[0][:5] and out.usage.completion_tokens == 5
    assert out.choices[0].message.content == server.service.pipe.decode(ref.tokens[0][:5])
    assert out.choices[0].finish_reason == "length"


def test_stop_strings_cut_the_text(server, client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, seed=9, max_tokens=24, stop=None,
                                          extra_body=FAST).choices[0].message.content  # fmt: skip
    assert len(full) > 4, full
    stop = full[2:4]
    for stream in (False, True):
        out = client.chat.completions.create(
            model="tiny", messages=MESSAGES, seed=9, max_tokens=24, stop=[stop, "never"], stream=stream,
            extra_body=FAST,
        )  # fmt: skip
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = out.choices[0].message.content, out.choices[0].finish_reason
        assert text == full[: full.index(stop)] and reason == "stop"


def test_temperature_scales_the_schedule(server, client):
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, seed=3, max_tokens=8, temperature=0.5, extra_body=FAST
    )
    defaults = server.service.defaults
    ref = alone(server, seed=3, max_new_tokens=8, t_min=defaults.t_min * 0.5, t_max=defaults.t_max * 0.5, **FAST)
    assert out.choices[0].message.content == ref.text


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"max_tokens": 8, "max_completion_tokens": 9}, "max_completion_tokens"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "name": "me"}]}, "messages"),
]


@pytest.mark.parametrize("fields, param", BAD)
def test_chat_refusals(server, fields, param):
    body = {"model": "tiny", "messages": MESSAGES} | fields
    status, _, answer = server.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and answer["error"]["param"] == param, answer


def test_the_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions")):
            status, _, answer = server.request(method, path, {"model": "tiny", "messages": MESSAGES}, headers)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/health")[0] == 200  # load balancers probe without the key
    assert server.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_stream_of_a_completion_prompt(server):
    """The raw prompt, no chat format, streamed: OpenAI's text_completion chunks."""
    body = {"model": "tiny", "prompt": "hello", "seed": 0, "max_tokens": 8, "stream": True} | FAST
    status, _, text = server.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    sent = [json.loads(data) for _, data in events(text)[:-1]]
    ref = server.service.pipe.generate("hello", chat=False, seed=0, max_new_tokens=8, **FAST)
    assert status == 200 and all(s["object"] == "text_completion" for s in sent)
    assert "".join(s["choices"][0]["text"] for s in sent) == ref.text
