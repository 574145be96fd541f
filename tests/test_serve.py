"""Conversations, `dartprune chat` and `dartprune serve`: the cache kept across turns and each turn traced; the
OpenAI-compatible server driven by the official `openai` client (streaming and not), bad requests answered with a
4xx and the server still serving, and a bounded load test on the loopback address."""
from __future__ import annotations

import io
import json
import re
import socket
import threading
import time

import pytest
import torch

from dartprune import DartConfig
from dartprune.cli.chat import chat_loop
from dartprune.decode.chat import Conversation
from dartprune.decode.generate import Generator, SamplingParams
from tests.tiny_models import tiny_model, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- conversations
def test_conversation_keeps_the_cache_and_traces_each_turn():
    model, tokenizer = tiny_model("llama"), chat_tokenizer()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    with Generator(model, tokenizer, DartConfig(sparsity=0.5)) as generator:
        chat = Conversation(generator)
        first = chat.say("the harbour at night", params)
        cached = generator.native.cache.length
        second = chat.say("how do you bake bread?", params)
        engine = generator.engine
        kept_after = [engine.kept(0, layer) for layer in range(len(engine.layers))]
        stats = engine.stats()[0]
    assert cached == len(chat.turns[0].reply.tokens) - 1 + len(chat.render(chat.messages[:1]))
    assert chat.turns[1].new_tokens < len(chat.render(chat.messages[:3]))      # only the new turn was fed
    # one sequence: every cached token fed once, and again where a rewind cut the cache back
    assert stats.tokens == generator.native.cache.length + sum(t.rewound for t in chat.turns)
    assert len(chat.messages) == 4 and chat.messages[3]["content"] == second.text
    assert first.stats.keep_counts == stats.keep_counts                       # budgets stay; the neurons move
    fresh = Generator(model, tokenizer, DartConfig(sparsity=0.5))
    try:
        single = Conversation(fresh)
        single.say("the harbour at night", params)
        kept_first = [fresh.engine.kept(0, layer) for layer in range(len(fresh.engine.layers))]
    finally:
        fresh.close()
    assert any(not torch.equal(a, b) for a, b in zip(kept_first, kept_after))  # the second turn re-traced


def test_a_new_turn_under_attach_with_generate_equals_the_native_loop():
    """`handle.new_turn()` before `model.generate(..., cache=cache)`: the turn is traced like a prompt and
    the masks rebuilt, exactly as the native loop does it (same tokens, same kept neurons)."""
    from transformers import DynamicCache

    import dartprune
    model = tiny_model("llama")
    first, second = torch.arange(3, 23), torch.arange(40, 52)
    config = DartConfig(sparsity=0.5, detector="none")
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=6, min_new_tokens=6,
                  pad_token_id=0)
    with torch.no_grad(), dartprune.attach(model, config) as handle:
        cache = DynamicCache(config=model.config)
        out = model.generate(first[None], cache=cache, **greedy)
        kept_first = [handle.engine.kept(0, layer) for layer in range(len(handle.engine.layers))]
        handle.new_turn()
        out2 = model.generate(torch.cat([out[0], second])[None], cache=cache, **greedy)
        hf_tokens = out[0, first.numel():].tolist(), out2[0, out.shape[1] + second.numel():].tolist()
        hf_kept = [handle.engine.kept(0, layer) for layer in range(len(handle.engine.layers))]
    with Generator(model, tiny_tokenizer(), config) as generator:
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        one = generator.generate(first, params)
        two = generator.continue_(torch.cat([torch.tensor(one.tokens[-1:]), second]), params)
        native_kept = [generator.engine.kept(0, layer) for layer in range(len(generator.engine.layers))]
    assert (one.tokens, two.tokens) == (hf_tokens[0], hf_tokens[1])
    assert all(torch.equal(torch.sort(a).values, torch.sort(b).values) for a, b in zip(hf_kept, native_kept))
    assert any(not torch.equal(torch.sort(a).values, torch.sort(b).values) for a, b in zip(kept_first, hf_kept))


def test_static_keeps_the_first_turns_mask():
    model, tokenizer = tiny_model("llama"), chat_tokenizer()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with Generator(model, tokenizer, DartConfig(method="static", sparsity=0.5)) as generator:
        chat = Conversation(generator)
        chat.say("the harbour at night", params)
        before = [generator.engine.kept(0, layer) for layer in range(4)]
        reply = chat.say("how do you bake bread?", params)
        after = [generator.engine.kept(0, layer) for layer in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert reply.stats.retrace_count == 0           # a kept mask is not reported as a re-trace


def test_a_turn_over_the_context_is_refused_and_changes_nothing():
    model, tokenizer = tiny_model("llama"), chat_tokenizer()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with Generator(model, tokenizer, DartConfig(sparsity=0.5)) as generator:
        chat = Conversation(generator)
        chat.say("the harbour at night", params)
        length, tokens = generator.native.cache.length, list(chat.tokens)
        with pytest.raises(ValueError, match="the model's context is 4096 tokens"):
            chat.say("and then?", SamplingParams(max_new_tokens=5000))
        assert generator.native.cache.length == length and chat.tokens == tokens and len(chat.turns) == 1
        chat.say("and then?", params)
        with pytest.raises(ValueError, match="the message is not valid Unicode"):   # a byte that was not UTF-8
            chat.say("caf\udce9", params)
        assert len(chat.turns) == 2
    assert chat.turns[1].rewound >= 0


def test_conversation_equals_one_sequence_for_dense():
    """Dense, the turn-by-turn cache gives the same reply as rendering the whole conversation at once."""
    model, tokenizer = tiny_model("qwen2"), chat_tokenizer()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with Generator(model, tokenizer) as generator:
        chat = Conversation(generator)
        chat.say("the harbour at night", params)
        reply = chat.say("and in the morning?", params)
        whole = generator.generate(torch.tensor(chat.render(chat.messages[:3])), params)
    assert reply.tokens == whole.tokens


def test_chat_loop_commands_and_interrupt():
    model, tokenizer = tiny_model("llama"), chat_tokenizer()
    with Generator(model, tokenizer, DartConfig(sparsity=0.5)) as generator:
        chat = Conversation(generator)
        out = io.StringIO()
        chat_loop(chat, SamplingParams(max_new_tokens=5, ignore_eos=True),
                  io.StringIO("the harbour\n/stats\n/nope\n/reset\n/stats\nbread\n/quit\nnever read\n"), out, False)
        text = out.getvalue()
        assert "1 turn, 5 reply tokens" in text and "unknown command /nope" in text
        assert "conversation reset" in text and "no turns yet" in text and len(chat.turns) == 1
        stops = iter([False, False, True])
        reply = chat.say("and then?", SamplingParams(max_new_tokens=20, ignore_eos=True),
                         should_stop=lambda: next(stops))
        assert reply.finish_reason == "interrupted" and len(reply.tokens) == 3


class _CtrlCAtSecondPrompt(io.StringIO):
    def readline(self, *args) -> str:
        line = super().readline(*args)
        if line.startswith("/interrupt"):
            raise KeyboardInterrupt
        return line


def test_ctrl_c_at_the_chat_prompt_ends_the_chat_quietly():
    model, tokenizer = tiny_model("llama"), chat_tokenizer()
    with Generator(model, tokenizer, DartConfig(sparsity=0.5)) as generator:
        chat = Conversation(generator)
        chat_loop(chat, SamplingParams(max_new_tokens=3, ignore_eos=True),
                  _CtrlCAtSecondPrompt("the harbour\n/interrupt\nnever read\n"), io.StringIO(), True)
        assert len(chat.turns) == 1


def test_conversation_needs_the_native_loop_and_a_template():
    with pytest.raises(ValueError, match="native loop"):
        Conversation(Generator(tiny_model("gpt2"), chat_tokenizer()))
    with pytest.raises(ValueError, match="chat template"):
        Conversation(Generator(tiny_model("llama"), tiny_tokenizer()))


def test_chat_cli_refuses_what_the_native_loop_does_not_run(tmp_path, capsys):
    from dartprune.cli.main import main
    with pytest.raises(SystemExit):
        main(["chat", "--method", "threshold"])
    assert "invalid choice: 'threshold'" in capsys.readouterr().err
    assert main(["chat", "--set", "method=threshold"]) == 2
    assert "set method with --method, not --set" in capsys.readouterr().err
    tiny_model("gpt2").save_pretrained(tmp_path)
    chat_tokenizer().save_pretrained(tmp_path)
    assert main(["chat", "--model", str(tmp_path)]) == 2
    assert "(gpt2) is not one. `dartprune generate --loop hf` runs it" in capsys.readouterr().err
    assert main(["chat", "--calibration-file", "x.safetensors"]) == 2
    assert "--calibration-file is for the calibrated methods; --method dart takes none" in capsys.readouterr().err
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    chat_tokenizer().save_pretrained(tmp_path / "llama")
    missing = tmp_path / "none.safetensors"           # the option reaches the method
    assert main(["chat", "--model", str(tmp_path / "llama"), "--method", "wanda-static", "--calibration-file",
                 str(missing)]) == 2
    assert f"calibration file {missing} not found" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "llama"), "--max-new-tokens", "9000"]) == 2
    assert "--max-new-tokens 9000 after a one-token turn take 9001 positions" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the server
def _http(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST of `body`, with the standard library only."""
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=body, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_server():
    pytest.importorskip("fastapi")
    from dartprune.serving.app import ModelServer
    torch.set_num_threads(1)
    model_server = ModelServer(tiny_model("llama"), chat_tokenizer(), "tiny", DartConfig(sparsity=0.5))
    yield model_server
    model_server.close()


@pytest.fixture(scope="module")
def server(model_server):
    uvicorn = pytest.importorskip("uvicorn")
    from dartprune.serving.app import create_app
    port = _free_port()
    config = uvicorn.Config(create_app(model_server), host="127.0.0.1", port=port, log_level="error")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    for _ in range(200):
        if running.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="not-needed", max_retries=0)


def test_openai_client_chat_and_completions(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny'"):
        client.models.retrieve("other")
    as_system, as_developer = (client.chat.completions.create(
        model="tiny", messages=[{"role": role, "content": "Answer briefly."}, {"role": "user", "content": "harbour"}],
        max_tokens=4, temperature=0) for role in ("system", "developer"))    # OpenAI's newer name for the system role
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the harbour"}],
                                           max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 6 and reply.usage.total_tokens == (
        reply.usage.prompt_tokens + reply.usage.completion_tokens)
    extension = reply.model_extra["dartprune"]
    assert extension["method"] == "dart" and extension["sparsity"] == 0.5 and 0 < extension["executed_sparsity"] < 0.5
    text = client.completions.create(model="tiny", prompt="the light on the water", max_tokens=5, temperature=0,
                                     extra_body={"dartprune": {"method": "static", "sparsity": 0.7}})
    assert text.object == "text_completion" and text.model_extra["dartprune"]["method"] == "static"
    assert text.model_extra["dartprune"]["sparsity"] == 0.7


def test_openai_client_streams_the_same_text(client):
    messages = [{"role": "user", "content": "bread and water"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the harbour", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == client.completions.create(model="tiny", prompt="the harbour", max_tokens=6,
                                                 temperature=0).choices[0].text


def test_a_completion_takes_several_prompts_and_token_ids_as_openai_does(client, model_server):
    """A list of prompts (text or token ids, the forms OpenAI's API takes) gives one choice per prompt, in order,
    each what that prompt alone gives; usage sums them and the engine's figures come per prompt. Streamed, the
    same text arrives under each choice's index."""
    prompts = ["the harbour", "a lamp in the window", "bread"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0) for p in prompts]
    batch = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    figures = batch.model_extra["dartprune"]
    assert isinstance(figures, list) and [f["method"] for f in figures] == ["dart"] * 3
    ids = [model_server.tokenizer(p).input_ids for p in prompts]
    assert client.completions.create(model="tiny", prompt=ids[1], max_tokens=5, temperature=0).choices[0].text == \
        alone[1].choices[0].text
    assert [c.text for c in client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0).choices] \
        == [a.choices[0].text for a in alone]
    texts, usage = ["", "", ""], None
    for chunk in client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert texts == [a.choices[0].text for a in alone]
    assert usage.total_tokens == batch.usage.total_tokens


@pytest.mark.parametrize("prompt, needle", [([], "prompt must not be empty"),
                                            (["the harbour", ""], "prompt 1 must not be empty"),
                                            ([[]], "prompt must not be empty"),
                                            ([5, -1], r"token ids must be in \[0, "),
                                            ([[5], [10 ** 6]], r"prompt 1: token ids must be in \[0, "),
                                            ([5, "a"], "prompt")])
def test_bad_prompt_lists_are_a_400(server, prompt, needle):
    code, answer = _http(server + "/v1/completions", json.dumps({"model": "tiny", "prompt": prompt,
                                                                 "max_tokens": 2}).encode())
    assert code == 400 and re.search(needle, answer["error"]["message"])
    assert answer["error"]["param"] == "prompt"
    assert _http(server + "/v1/completions", json.dumps({"model": "tiny", "prompt": "ok", "max_tokens": 2}
                                                        ).encode())[0] == 200


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "tiny", "messages": []}, 400, "messages must not be empty"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "dartprune": {"sparsity": 1.5}}, 400,
     "sparsity"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "dartprune": {"windw": 3}}, 400, "windw"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400,
     "the model's context is"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")}, 400,
     "finite number"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_k": -5}, 400, "top_k"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "min_p": 0.1}, 400,
     "does not know the option min_p"),
    ({"model": "tiny", "messages": [{"role": "pirate", "content": "hi"}]}, 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n = 1"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "dartprune": {"monitored_layers": [50]}},
     400, "out of range"),                      # found only when the engine is built
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
      "dartprune": {"calibration_file": "/etc/passwd"}}, 400, "not per request"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400,
     "does not support logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400,
     "does not support frequency_penalty"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 64}, 400, "seed must be in"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "dartprune": {"ring_size": 10 ** 11}}, 400,
     "ring_size must be <= 4096"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "caf\ud800"}]}, 400, "not valid Unicode"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, 400,
     "not valid Unicode"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}, 400,
     "not valid Unicode"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400,
     "does not know the option messages.0.name"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
      "stream_options": {"include_usage": True, "foo": 1}}, 400, "does not know the option stream_options.foo"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
     400, "only allowed when stream is true"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, needle):
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert _http(server + "/v1/chat/completions", json.dumps(good).encode())[0] == 200
    code, answer = _http(server + "/v1/chat/completions", json.dumps(body).encode())
    assert code == status
    error = answer["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert _http(server + "/health") == (200, {"status": "ok", "model": "tiny"})
    code, answer = _http(server + "/v1/chat/completions", json.dumps(good).encode())     # the same settings again
    assert code == 200 and answer["dartprune"]["loop"] == "native", answer


def test_a_streamed_request_with_settings_the_engine_refuses_is_a_400(server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True,
            "dartprune": {"monitored_layers": [50]}}
    code, answer = _http(server + "/v1/completions", json.dumps(body).encode())
    assert code == 400 and "out of range" in answer["error"]["message"]


def test_a_prompt_that_is_not_valid_unicode_is_a_400(server):
    """A JSON escape of half a UTF-16 pair: no tokenizer takes it (it had been a 500)."""
    body = {"model": "tiny", "prompt": "caf\ud800", "max_tokens": 3}
    code, answer = _http(server + "/v1/completions", json.dumps(body).encode())
    assert code == 400 and "not valid Unicode" in answer["error"]["message"], answer
    assert answer["error"]["param"] == "prompt"


def test_malformed_json_is_a_400(server):
    code, answer = _http(server + "/v1/completions", b"{not json")
    assert code == 400 and "JSON" in answer["error"]["message"] and answer["error"]["param"] is None
    body = json.dumps({"model": "tiny", "prompt": "the harbour", "max_tokens": 2}).encode()
    code, answer = _http(server + "/v1/completions", body, "application/x-www-form-urlencoded")   # curl -d's
    assert code == 400 and answer["error"]["message"].startswith("send the body as JSON with the header Content-Type")
    assert "application/x-www-form-urlencoded" in answer["error"]["message"]
    assert _http(server + "/v1/completions", body)[0] == 200


def test_completion_options_it_would_ignore_are_refused_and_neutral_values_pass(server):
    base = {"model": "tiny", "prompt": "the harbour", "max_tokens": 2}
    for extra, name in (({"echo": True}, "echo"), ({"logprobs": 2}, "logprobs"), ({"best_of": 3}, "best_of"),
                        ({"logit_bias": {"5": 3.0}}, "logit_bias")):
        code, answer = _http(server + "/v1/completions", json.dumps({**base, **extra}).encode())
        assert code == 400 and answer["error"]["param"] == name, answer
    neutral = {"echo": False, "logprobs": None, "best_of": 1, "presence_penalty": 0, "user": "someone"}
    assert _http(server + "/v1/completions", json.dumps({**base, **neutral}).encode())[0] == 200
    code, answer = _http(server + "/v1/completions", json.dumps({**base, "max_completion_tokens": 4}).encode())
    assert code == 400 and answer["error"]["param"] == "max_completion_tokens"     # a chat option, not this route's


def test_routine_openai_fields_pass_at_their_neutral_values(server):
    """Fields clients send by habit change nothing here; a tool call asked for is refused."""
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    routine = {"tools": [], "tool_choice": "none", "parallel_tool_calls": False, "store": False, "metadata": {},
               "service_tier": "auto", "functions": None, "function_call": "none", "user": "someone"}
    code, answer = _http(server + "/v1/chat/completions", json.dumps({**base, **routine}).encode())
    assert code == 200, answer
    code, answer = _http(server + "/v1/chat/completions", json.dumps({**base, "tool_choice": "required"}).encode())
    assert code == 400 and answer["error"]["param"] == "tool_choice"


def test_top_k_one_is_greedy(server):
    base = {"model": "tiny", "prompt": "the harbour", "max_tokens": 6}
    greedy = _http(server + "/v1/completions", json.dumps({**base, "temperature": 0}).encode())[1]
    for seed in (1, 2):
        code, answer = _http(server + "/v1/completions", json.dumps({**base, "top_k": 1, "temperature": 1.5,
                                                                     "seed": seed}).encode())
        assert code == 200 and answer["choices"][0]["text"] == greedy["choices"][0]["text"]
    code, answer = _http(server + "/v1/completions", json.dumps({**base, "top_k": -1, "seed": 3}).encode())
    assert code == 200                                                             # -1: no top-k filter


def test_unknown_routes_answer_in_the_openai_error_shape(server):
    code, answer = _http(server + "/v1/nothing-here", b"{}")
    assert code == 404 and answer["error"]["type"] == "invalid_request_error"
    code, answer = _http(server + "/v1/models", b"{}")               # POST where only GET is served
    assert code == 405 and "error" in answer


def test_chat_content_may_be_a_list_of_text_parts(server):
    def reply(content):
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                "temperature": 0}
        return _http(server + "/v1/chat/completions", json.dumps(body).encode())
    code, whole = reply("the harbour at night")
    assert code == 200
    code, parts = reply([{"type": "text", "text": "the harbour "}, {"type": "text", "text": "at night"}])
    assert code == 200 and parts["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]
    code, answer = reply([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])
    assert code == 400


def test_dense_per_request_reports_no_sparsity(server):
    body = {"model": "tiny", "prompt": "the harbour", "max_tokens": 2, "dartprune": {"method": "dense"}}
    code, answer = _http(server + "/v1/completions", json.dumps(body).encode())
    assert code == 200 and answer["dartprune"]["sparsity"] == 0.0 and answer["dartprune"]["method"] == "dense"
    body["dartprune"] = {"method": "dense", "sparsity": 0.5, "window": 8}      # refused, as generate refuses them
    code, answer = _http(server + "/v1/completions", json.dumps(body).encode())
    assert code == 400 and answer["error"]["message"] == ("dartprune settings: method 'dense' prunes nothing, so "
                                                          "['sparsity', 'window'] would change nothing")


def test_serve_refuses_default_settings_it_cannot_run_before_serving(tmp_path, capsys):
    from dartprune.cli.main import main
    tiny_model("llama").save_pretrained(tmp_path)
    chat_tokenizer().save_pretrained(tmp_path)
    common = ["serve", "--model", str(tmp_path), "--port", str(_free_port())]
    assert main([*common, "--loop", "native", "--method", "threshold", "--set", "calibration_file=x"]) == 2
    assert "the native loop does not run 'llama' models with method 'threshold'" in capsys.readouterr().err
    assert main([*common, "--set", "monitored_layers=(50,)"]) == 2
    assert "monitored layer 50 is out of range" in capsys.readouterr().err
    assert main([*common, "--sparsity", "0.7", "--set", "sparsity=0.3"]) == 2
    assert "set sparsity with --sparsity, not --set" in capsys.readouterr().err


def test_a_server_started_dense_prunes_a_request_that_asks_for_a_method_at_its_sparsity():
    """`serve --method dense --sparsity 0.5`: a request for DART runs DART at 0.5, not unpruned."""
    pytest.importorskip("fastapi")
    from dartprune.serving.app import ModelServer
    dense_server = ModelServer(tiny_model("llama"), chat_tokenizer(), "tiny", DartConfig(method="dense", sparsity=0.5))
    try:
        config = dense_server.settings({"method": "dart"})
        assert config.method == "dart" and config.pruned_sparsity == 0.5
        assert dense_server.settings(None).pruned_sparsity == 0.0
    finally:
        dense_server.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_its_generation(server, model_server, monkeypatch, stream):
    """A reply nobody reads would hold the model from every other request: generation ends at the next token."""
    import http.client
    import urllib.parse
    finished, started = [], threading.Event()
    real = model_server.run

    def recording(ids, params, config, on_text=None, should_stop=None):
        def slowly() -> bool:              # at least 2 ms a token, so that 4000 tokens outlast the disconnect
            started.set()
            time.sleep(0.002)
            return should_stop()
        finished.append(real(ids, params, config, on_text, slowly))
        return finished[-1]

    monkeypatch.setattr(model_server, "run", recording)
    address = urllib.parse.urlparse(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    body = {"model": "tiny", "prompt": "zzz", "max_tokens": 4000, "temperature": 0, "stream": stream,
            "dartprune": {"method": "dense"}}
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
    assert started.wait(60)                              # generation has begun
    # ("zzz" runs to 4000 tokens on this model without an end-of-sequence token)
    connection.sock.shutdown(2)
    connection.close()
    for _ in range(600):                                 # wait for it to end (a loop, not a timing assertion)
        if finished:
            break
        time.sleep(0.1)
    assert finished and finished[0].finish_reason == "interrupted" and len(finished[0].tokens) < 4000


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_load_eight_clients_fifty_requests(client):
    """Every response complete and well-formed, none lost; memory flat across the second half of the load."""
    def one(i: int) -> tuple[int, str, str]:
        if i % 2:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"turn {i}"}],
                                               max_tokens=4, temperature=0)
            return i, r.choices[0].finish_reason, r.object
        r = client.completions.create(model="tiny", prompt=f"prompt {i}", max_tokens=4, temperature=0)
        return i, r.choices[0].finish_reason, r.object

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        warm = list(pool.map(one, range(25)))
        before = _rss_mb()
        rest = list(pool.map(one, range(25, 50)))
        after = _rss_mb()
    results = warm + rest
    assert sorted(i for i, _, _ in results) == list(range(50))
    assert all(reason in ("stop", "length") for _, reason, _ in results)
    assert {kind for _, _, kind in results} == {"chat.completion", "text_completion"}
    assert after - before < 50, (before, after)
