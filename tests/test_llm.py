"""Stage 01 against a real chat-completions server on 127.0.0.1."""
import email.utils
import json
import os
import subprocess
import sys
import time

import pytest

import llm
from conftest import ROOT, load_stage
from llm_server import FakeLLM

corpus_stage = load_stage("01_build_corpus.py")
KEY = "sk-test-DO-NOT-LEAK-4242"


@pytest.fixture(scope="module")
def world20(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm20")
    names = [f"thing number {i}" if i % 3 else f"odd class {i}" for i in range(20)]
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def run_stage(root, out, url, *extra):
    args = ["--dataset", "llmtest", "--data-root", str(root), "--out", str(out), "--llm-model", "fake-gpt",
            "--llm-base-url", url, "--llm-backoff", "0.05", "--llm-timeout", "0.5", "--skip-data-check", *extra]
    corpus_stage.main(args)
    return json.loads(out.read_text())


def test_parse_list_formats():
    for fmt in ("1. a\n2. b", "Here you go:\n1) a\n2) b", "- a\n- b", "* a\n* b", "\u2022 a\n\u2022 b", "a\nb",
                "1. **a**\n2. b", "Sure, here they are\n\n1. a\n2. b\n\nThese features should help you identify it.",
                "Features of a thing:\n- a\n- b\nI hope this helps!"):
        assert llm.parse_list(fmt) == ["a", "b"], fmt


def test_a_reasoning_models_thinking_is_not_read_as_descriptors(world20, tmp_path, capsys):
    think = "<think>\nSteps:\n1. size\n2. place\n</think>\n\n1. a\n2. b"
    for answer in (think, think.replace("<think>", "<THINK>"), think.replace("<think>\n", ""), "1. a\n2. b"):
        assert llm.parse_list(llm.visible_text(answer)) == ["a", "b"], answer
    assert llm.visible_text("<think>\n1. size\n2. place") == ""  # cut off while thinking: no descriptor in it
    with FakeLLM("thinking") as server:
        corpus = run_stage(world20, tmp_path / "corpus.json", server.url)
    for name, raw in zip(corpus["classnames"], corpus["descriptors_raw"]):
        assert raw == [f"feature {k} of {name}" for k in range(10)]
    assert server.requests == 20 + 7  # the seven 'odd' classes' first answers held no list: asked again
    assert "note: 27 answers held a reasoning model's <think> block" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "llm_cache.jsonl").read_text().splitlines()]
    assert sum("Let me list candidates" in r["answer"] for r in rows) == 27  # the cache keeps each answer whole


def test_an_answer_in_chunks_gives_its_text_chunks_and_keeps_its_thinking_in_the_cache(world20, tmp_path, capsys):
    with FakeLLM("chunks") as server:
        corpus = run_stage(world20, tmp_path / "corpus.json", server.url)
    for name, raw in zip(corpus["classnames"], corpus["descriptors_raw"]):
        assert raw == [f"feature {k} of {name}" for k in range(10)]  # not "its size", the thinking's first step
    assert server.requests == 20  # each first answer is read, none asked again
    assert "note: 20 answers held a reasoning model's <think> block" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "llm_cache.jsonl").read_text().splitlines()]
    assert all(r["answer"].startswith("<think>Okay. Candidates:") for r in rows)


@pytest.mark.parametrize("mode", ["ok", "fail500", "429", "perminute", "hang", "short"])
def test_twenty_classes_get_ten_descriptors(world20, tmp_path, mode):
    with FakeLLM(mode) as server:
        corpus = run_stage(world20, tmp_path / "corpus.json", server.url)
    assert [len(d) for d in corpus["descriptors"]] == [10] * 20
    for name, descs, raw in zip(corpus["classnames"], corpus["descriptors"], corpus["descriptors_raw"]):
        assert raw == [f"feature {k} of {name}" for k in range(10)]  # no closing remark among them
        assert all(d == f"{name}, which has feature {k} of {name}" for k, d in enumerate(descs))
    bound = {"ok": 20, "fail500": 60, "429": 40, "perminute": 40, "hang": 40, "short": 40}[mode]
    assert server.requests == bound, (mode, server.requests)
    assert corpus["meta"]["llm"]["model"] == "fake-gpt" and not corpus["meta"]["llm"]["short"]
    rows = [json.loads(line) for line in (tmp_path / "llm_cache.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"fake-gpt"}


def test_cupl_sentences_join_the_corpus(world20, tmp_path):
    with FakeLLM() as server:
        corpus = run_stage(world20, tmp_path / "corpus.json", server.url, "--cupl-answers", "2", "--per-class", "0")
    assert server.requests == 20 + 20 * 5 * 2
    assert corpus["meta"]["sources"]["cupl_llm"]["sentences"] == 20 * 5 * 2 * 2
    assert corpus["meta"]["per_class_sentences"]["cupl_llm"] == [20] * 20
    assert any("It is a picture of" in s for s in corpus["sentences"][0])


def test_interrupted_run_resumes_from_the_cache(world20, tmp_path):
    out = tmp_path / "corpus.json"
    cache = tmp_path / "llm_cache.jsonl"
    with FakeLLM(delay=0.2) as server:
        cmd = [sys.executable, str(ROOT / "01_build_corpus.py"), "--dataset", "llmtest", "--data-root", str(world20),
               "--out", str(out), "--llm-model", "fake-gpt", "--llm-base-url", server.url, "--llm-concurrency", "1",
               "--skip-data-check"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OPENAI_API_KEY=KEY))
        deadline = time.time() + 60
        while time.time() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 5):
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        done = len(cache.read_text().splitlines())
        assert 5 <= done < 20 and not out.exists()
        before = server.requests
        run_stage(world20, out, server.url)
        assert server.requests - before == 20 - done  # only the classes not cached yet
        before = server.requests
        run_stage(world20, out, server.url)
        assert server.requests == before  # a complete rerun asks nothing


def test_dry_run_counts_requests(world20, tmp_path):
    with FakeLLM() as server:
        with pytest.raises(SystemExit, match="20 first requests for 20 classes, 0 cached, 20 to ask"):
            run_stage(world20, tmp_path / "corpus.json", server.url, "--dry-run")
        assert server.requests == 0
        question = ["--llm-question", "Give {m} visual traits of {a} {c}, distinguishing {c} in a photo."]
        run_stage(world20, tmp_path / "corpus.json", server.url, *question)
        asked = server.requests
        with pytest.raises(SystemExit, match="20 first requests for 20 classes, 20 cached, 0 to ask"):
            run_stage(world20, tmp_path / "corpus.json", server.url, "--dry-run", *question)
    assert server.requests == asked  # counted against the question in use, and asked nothing


def test_classes_without_answer_stop_the_run_and_keep_the_cache(world20, tmp_path, capsys):
    out, cache = tmp_path / "corpus.json", tmp_path / "llm_cache.jsonl"
    with FakeLLM("broken") as server:
        with pytest.raises(SystemExit) as e:
            run_stage(world20, out, server.url, "--llm-backoff", "0.001")
        msg = str(e.value)
        assert "7 classes got no usable answer" in msg and "odd class 0" in msg and "--allow-llm-failures" in msg
        assert not out.exists() and len(cache.read_text().splitlines()) == 13  # the answers that came are kept
        assert KEY not in msg and KEY not in capsys.readouterr().out  # the server echoed the key: cut out
        assert "[key]" in msg
        corpus = run_stage(world20, out, server.url, "--llm-backoff", "0.001", "--allow-llm-failures")
    without = corpus["meta"]["classes_without_descriptors"]
    assert len(without) == 7 and all(n.startswith("odd class") for n in without)
    assert [len(d) for d in corpus["descriptors"]].count(0) == 7


def test_a_key_on_the_command_line_is_refused(world20, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_stage(world20, tmp_path / "corpus.json", "http://127.0.0.1:9/v1", "--llm-key", "sk-on-the-command-line")
    assert "OPENAI_API_KEY" in str(e.value) and "sk-on-the-command-line" not in str(e.value) + capsys.readouterr().out
    out = subprocess.run(["make", "-C", str(ROOT), "-n", "corpus", f"RUN={tmp_path / 'run'}",
                          "CORPUS_ARGS=--llm-key sk-on-the-command-line"], capture_output=True, text=True)
    assert out.returncode != 0 and "OPENAI_API_KEY" in out.stderr
    assert "sk-on-the-command-line" not in out.stdout + out.stderr and not (tmp_path / "run").exists()


def test_key_file(world20, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    (tmp_path / "key").write_text(KEY + "\n")
    with FakeLLM() as server:
        run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-key-file", str(tmp_path / "key"))
    assert server.auth == {f"Bearer {KEY}"}
    assert KEY.encode() not in (tmp_path / "corpus.json").read_bytes()


def test_key_never_reaches_files_or_logs(world20, tmp_path, capsys):
    with FakeLLM("fail500") as server:
        run_stage(world20, tmp_path / "corpus.json", server.url)
    assert server.auth == {f"Bearer {KEY}"}  # it was sent ...
    captured = capsys.readouterr()
    assert KEY not in captured.out and KEY not in captured.err  # ... but never printed
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path  # ... nor written


def test_401_stops_at_once_and_says_what_to_check(world20, tmp_path):
    with FakeLLM("401") as server:
        with pytest.raises(SystemExit) as e:
            run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-concurrency", "1")
    msg = str(e.value)
    assert "401" in msg and "OPENAI_API_KEY" in msg and server.url in msg and KEY not in msg
    assert server.requests == 1  # no retries, and no other class's request once the first answer said 401


def test_unknown_model_stops_at_once(world20, tmp_path):
    with FakeLLM("404") as server:
        with pytest.raises(SystemExit) as e:
            run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-concurrency", "1")
    msg = str(e.value)
    assert "'fake-gpt' not found" in msg and server.url in msg and "does not exist" in msg
    assert server.requests == 1  # no retry, and no other class's request once the first answer said 404


def test_an_address_without_chat_completions_says_to_check_the_base_url_not_the_model(world20, tmp_path):
    with FakeLLM("nopage") as server:
        with pytest.raises(SystemExit) as e:
            run_stage(world20, tmp_path / "corpus.json", server.url.removesuffix("/v1"), "--llm-concurrency", "1")
    msg = str(e.value)
    assert f"{server.url}/chat/completions" not in msg and "no chat completions at this address" in msg
    assert f"under /v1: {server.url}?" in msg and "OPENAI_BASE_URL" in msg and "not found?" not in msg
    assert server.requests == 1
    with FakeLLM("nopage") as server:  # an address that has /v1 already is not sent to /v1/v1
        with pytest.raises(SystemExit) as e:
            run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-concurrency", "1")
    assert "no chat completions at this address. Check OPENAI_BASE_URL" in str(e.value)


def test_a_base_url_pasted_with_the_endpoint_path_is_the_same_endpoint(world20, tmp_path):
    with FakeLLM() as server:
        first = run_stage(world20, tmp_path / "corpus.json", server.url + "/chat/completions/")
        again = run_stage(world20, tmp_path / "corpus.json", server.url)
    assert server.requests == 20 and first["descriptors"] == again["descriptors"]  # the rerun's answers all cached
    assert first["meta"]["llm"]["base_url"] == server.url


def test_a_model_that_refuses_the_temperature_says_which_flag_sets_it(world20, tmp_path):
    with FakeLLM("fixedtemperature") as server:
        with pytest.raises(SystemExit) as e:
            run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-concurrency", "1")
        msg = str(e.value)
        assert "'fake-gpt' refuses temperature 0.7" in msg and "--llm-temperature" in msg and "not found" not in msg
        assert server.requests == 1  # no retry: every request would get the same answer
        corpus = run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-temperature", "1")
    assert [len(d) for d in corpus["descriptors"]] == [10] * 20


@pytest.mark.parametrize("mode", ["quota", "tomorrow", "daily", "nofreetier"])
def test_a_spent_quota_or_a_day_s_wait_stops_the_run_at_once_keeping_the_answers(world20, tmp_path, mode):
    """OpenAI's spent credit, a Retry-After a day ahead, and Gemini's two that say so only in the body, past its first
    300 bytes: without the stop, every class would wait out its retries and fail, for hours on a benchmark."""
    with FakeLLM(mode) as server:
        with pytest.raises(SystemExit) as e:
            run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-concurrency", "1")
    msg = str(e.value)
    assert {"quota": "insufficient_quota: the account's credit or quota is spent",
            "tomorrow": "asks to wait 1440 minutes", "daily": "429, a daily quota is spent",
            "nofreetier": "429, limit 0: this account's plan has no quota for this model"}[mode] in msg, msg
    assert "The answers so far are cached" in msg
    assert server.requests == 6  # no retry of the sixth, no request for the classes after it
    assert len((tmp_path / "llm_cache.jsonl").read_text().splitlines()) == 5


def test_an_endpoint_that_stops_answering_mid_run_stops_the_run_after_one_class_s_retries(world20, tmp_path):
    """A server that dies after answering some classes: without the stop, each of the rest would wait out its own
    retries (hours for a benchmark's classes when each try hangs to the timeout)."""
    with FakeLLM("dies") as server:
        with pytest.raises(SystemExit) as e:
            run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-concurrency", "1", "--llm-backoff", "0.01")
    msg = str(e.value)
    assert "sent no answer, not even an error" in msg and "a rerun resumes" in msg and server.url in msg, msg
    assert server.requests == 5 + 7  # the sixth class's seven tries, none for the classes after it
    assert len((tmp_path / "llm_cache.jsonl").read_text().splitlines()) == 5


def test_a_wait_is_read_from_retry_after_or_else_from_gemini_s_retry_info():
    from llm_server import gemini_quota
    body = json.dumps(gemini_quota("perminute"))
    assert llm.asked_wait({}, body) == 1.0 and llm.asked_wait({"Retry-After": "7"}, body) == 7.0
    assert llm.asked_wait({}, '{"error": "slow down"}') is None and llm.spent_quota(body) is None
    openai = "Rate limit reached for gpt-4o-mini in organization org-x on requests per day (RPD): Limit 200, Used 200"
    assert llm.spent_quota(openai).startswith("a daily quota is spent")
    assert llm.spent_quota("Rate limit reached on tokens per min (TPM): Limit 30000, Used 29878") is None


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    now = 1_800_000_000.0
    assert llm.retry_after("7", now) == 7.0 and llm.retry_after(None, now) is None and llm.retry_after("soon") is None
    assert llm.retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert llm.retry_after(email.utils.formatdate(now + 30).replace("+0000", "-0000"), now) == 30.0
    assert llm.retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0  # a date already past


@pytest.mark.parametrize("mode", ["nullcontent", "nullchoices", "dropped", "badutf8"])
def test_broken_answers_are_retried(world20, tmp_path, mode):
    with FakeLLM(mode) as server:
        corpus = run_stage(world20, tmp_path / "corpus.json", server.url)
    assert [len(d) for d in corpus["descriptors"]] == [10] * 20
    assert server.requests == 40, (mode, server.requests)  # each prompt's first answer was broken, the second not


def test_an_answer_that_is_never_utf8_names_the_endpoint(world20, tmp_path):
    with FakeLLM("badutf8always") as server:
        with pytest.raises(SystemExit) as e:
            run_stage(world20, tmp_path / "corpus.json", server.url, "--llm-concurrency", "4", "--llm-backoff", "0.01")
    assert "This endpoint has answered nothing" in str(e.value) and server.url in str(e.value)
    assert "UnicodeDecodeError" in str(e.value)
    assert server.requests <= 4 * 7  # the first class out of retries stopped the rest: 7 tries each, 4 at a time


def test_an_endpoint_that_never_answers_stops_the_run_after_one_class_s_retries(world20, tmp_path):
    """Nothing listens on port 9: without the stop, each of a benchmark's classes would wait out its own retries."""
    t = time.time()
    with pytest.raises(SystemExit) as e:
        run_stage(world20, tmp_path / "corpus.json", "http://127.0.0.1:9/v1", "--llm-backoff", "0.01")
    msg = str(e.value)
    assert "http://127.0.0.1:9/v1" in msg and "connection failed" in msg and "OPENAI_BASE_URL" in msg, msg
    assert "This endpoint has answered nothing" in msg and time.time() - t < 20
    assert not (tmp_path / "corpus.json").exists()


def test_openai_without_a_key_is_refused_before_any_request(world20, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(SystemExit, match="no API key for https://api.openai.com/v1: put it in OPENAI_API_KEY"):
        run_stage(world20, tmp_path / "corpus.json", "https://api.openai.com/v1")
    assert not (tmp_path / "llm_cache.jsonl").exists() or not (tmp_path / "llm_cache.jsonl").read_text()


def test_the_timeout_bounds_the_whole_request(world20, tmp_path):
    """A server sending its answer a byte every 0.05 s (about 10 s for one answer) is cut off at --llm-timeout 0.5
    and asked again; before, each byte reset the timeout and every first answer took its full 10 s."""
    t = time.time()
    with FakeLLM("trickle") as server:
        corpus = run_stage(world20, tmp_path / "corpus.json", server.url)
    assert [len(d) for d in corpus["descriptors"]] == [10] * 20 and server.requests == 40
    assert time.time() - t < 8, time.time() - t
