"""Stage 01's LLM client: OpenAI-compatible chat completions, cached on disk, resumable, retried.

Standard library only (urllib + threads): the protocol is one JSON POST, and a client library would be one
more dependency for every user, most of whom import descriptors from a file. Works with OpenAI and with local
servers that speak the same protocol (vLLM, llama.cpp, Ollama).

The cache is a JSONL file: one line per answer, appended and flushed the moment the answer arrives, keyed by
(model, prompt, class, sample index). A rerun asks only for what is missing. The API key comes from the
environment or a key file, is sent in a header, and is never written or printed; server text that is printed has it
cut out.
"""
import datetime
import email.utils
import http.client
import json
import os
import sys
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

DESCRIPTOR_QUESTION = "List {m} useful features for distinguishing {c} in a photo."  # the paper's (Places-LT)
PLACEHOLDERS = "{m} (M, the number of descriptors), {c} or {CLS} (the class name), {a} (a or an)"


def fill(question, m, name):
    """The question for one class: {m}, {c} (or the paper's {CLS}) and {a} filled in; any other placeholder is an error
    naming it."""
    try:
        return question.format(m=m, c=name, CLS=name, a=article(name))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--llm-question {question!r}: cannot fill {e} in it; its placeholders are {PLACEHOLDERS} "
                         "(a literal brace is written twice: {{ }})") from None
CUPL_QUESTIONS = (  # CuPL's five ImageNet questions (Pratt et al. 2022)
    "Describe what {a} {c} looks like",
    "How can you identify {a} {c}?",
    "What does {a} {c} look like?",
    "Describe an image from the internet of {a} {c}",
    "A caption of an image of {a} {c}:",
)
RETRY_HINT = " Answer with exactly {m} numbered lines, one feature per line."


class LLMFatal(SystemExit):
    """An answer that retrying cannot fix (bad key, unknown model): stop the run at once."""


class _Skipped(Exception):
    """A request not sent because another one already failed with LLMFatal."""


def article(name):
    return "an" if name[:1].lower() in "aeiou" else "a"


LIST_MARK = re.compile(r"^\s*(\(?\d{1,2}[.):]|[-*\u2022\u2013])\s+")


def parse_list(text):
    """The items of a list answer. When some lines carry a list mark (1. 1) (1) - * •), only those are items, so a
    preamble and a closing remark ("These features should help you ...") are not; plain lines count only when no
    line is marked (a preamble ending in ':' is dropped then)."""
    lines = [line for line in text.splitlines() if line.strip()]
    marked = [line for line in lines if LIST_MARK.match(line)]
    if marked:
        items = [LIST_MARK.sub("", line, count=1) for line in marked]
    else:
        items = [line for i, line in enumerate(lines) if not (i == 0 and line.rstrip().endswith(":"))]
    items = [re.sub(r"\*\*|__", "", item).strip() for item in items]  # markdown bold
    return [item for item in items if item]


THINKING = re.compile(r"<think>.*?</think>", re.S | re.I)


def visible_text(answer):
    """An answer without a reasoning model's thinking. Local servers (vLLM, llama.cpp, Ollama) may leave the
    <think>...</think> of models such as DeepSeek-R1 or Qwen3 in the content, and its numbered steps would be read as
    descriptors. Text before a closing tag with no opening one is thinking too (some chat templates put the opening
    tag in the prompt); an opening tag never closed (an answer cut off while thinking) leaves nothing of it."""
    text = THINKING.sub("", answer)
    end = text.lower().rfind("</think>")
    text = text[end + len("</think>"):] if end >= 0 else text
    start = text.lower().find("<think>")
    return text[:start] if start >= 0 else text


def split_sentences(text):
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if len(s.strip()) > 3]


def endpoint_base(url):
    """The base URL the chat-completions path is added to: one pasted with that path already (as some providers'
    pages show the endpoint) or a trailing slash is the same endpoint, for the requests and the cache alike."""
    return url.rstrip("/").removesuffix("/chat/completions").rstrip("/")


class Cache:
    """Append-only JSONL of answers, keyed by (endpoint, model, temperature, prompt, class, sample): another endpoint or
    temperature asks again rather than reuse answers it did not give. A torn last line (a killed run) is ignored on
    reading, and so is an empty answer (none is written now; an older kit wrote them), which is asked again."""

    def __init__(self, path, base_url="", temperature=None):
        self.path = Path(path)
        self.base_url, self.temperature = endpoint_base(base_url), temperature
        self.lock = threading.Lock()
        self.answers, self.other_source = {}, 0
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (row.get("base_url"), row.get("temperature")) != (self.base_url, self.temperature):
                    self.other_source += 1  # kept in the file, not used for this endpoint and temperature
                elif str(row.get("answer") or "").strip():
                    self.answers[self.key(row["model"], row["prompt"], row["class"], row["sample"])] = row["answer"]

    @staticmethod
    def key(model, prompt, cls, sample):
        return json.dumps([model, prompt, cls, sample])

    def get(self, model, prompt, cls, sample):
        return self.answers.get(self.key(model, prompt, cls, sample))

    def put(self, model, prompt, cls, sample, answer):
        """Append an answer the moment it arrives; an empty one is not kept (a rerun asks again)."""
        if not str(answer or "").strip():
            return
        row = dict(base_url=self.base_url, model=model, temperature=self.temperature, prompt=prompt, **{"class": cls},
                   sample=sample, answer=answer, time=time.time())
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.answers[self.key(model, prompt, cls, sample)] = answer


MAX_RETRY_AFTER = 600  # seconds: a server that asks for longer is not waited for, request after request


def retry_after(value, now=None):
    """The seconds a Retry-After header asks to wait, given as seconds or as an HTTP date; None without one."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP dates are
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


RETRY_DELAY = re.compile(r'"retryDelay"\s*:\s*"([0-9.]+)s"')  # Google's RetryInfo, in the body of its 429s


def asked_wait(headers, body):
    """The seconds a 429 or 5xx asks to wait: its Retry-After header or, from Google's Gemini endpoint (which sends
    none), the RetryInfo retryDelay in its body; None where neither says."""
    asked = retry_after(headers.get("Retry-After"))
    found = RETRY_DELAY.search(body)
    return asked if asked is not None or not found else float(found.group(1))


def spent_quota(body):
    """Why a 429 will not pass within a run, read from its body; None for a rate limit that does. OpenAI answers an
    account out of credit with insufficient_quota; Google's Gemini names the quotas it enforced (quotaId
    "GenerateRequestsPerDayPerProjectPerModel-FreeTier" is the day's requests) and says "limit: 0" for a model the
    account may not use at all, and sends neither as a Retry-After."""
    if "insufficient_quota" in body:
        return "insufficient_quota: the account's credit or quota is spent (check its plan and billing)"
    if re.search(r"per[ _]?day", body, re.IGNORECASE):  # also OpenAI's "on requests per day (RPD)"
        return "a daily quota is spent: rerun when the provider resets it (Gemini: midnight Pacific time)"
    if re.search(r"\blimit: 0\b", body):
        return "limit 0: this account's plan has no quota for this model (another model, or a paid plan)"
    return None


def chunk_text(part):
    """The text of one content chunk: a text chunk's text, a thinking chunk's (its text or its own chunks) in <think>
    tags, nothing for other kinds (references, images)."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise TypeError(f"a content chunk is {type(part).__name__}, not an object")
    if part.get("type") == "text":
        return part["text"]
    if part.get("type") == "thinking":
        inner = part.get("thinking")
        inner = "".join(map(chunk_text, inner)) if isinstance(inner, list) else str(inner or "")
        return f"<think>{inner}</think>"
    return ""


class ChatClient:
    """POST {base_url}/chat/completions with retries for timeouts, 429 (Retry-After) and 5xx."""

    def __init__(self, base_url, model, api_key="", temperature=0.7, timeout=60.0, max_retries=6, backoff=1.0):
        self.base = endpoint_base(base_url)
        self.url = self.base + "/chat/completions"
        self.model, self.temperature, self.timeout = model, temperature, timeout
        self.max_retries, self.backoff = max_retries, backoff
        self._key = api_key
        self.requests = 0
        self.heard = None  # time.monotonic() of the server's last HTTP answer, of any status

    def __repr__(self):  # never shows the key
        return f"ChatClient({self.url!r}, model={self.model!r})"

    def redact(self, text):
        """Server text with the key cut out: some servers echo the Authorization header in their errors."""
        return text.replace(self._key, "[key]") if self._key else text

    def _post(self, body, headers):
        """The answer's bytes, within --llm-timeout for the whole request: a server that trickles its answer a byte at a
        time is cut off at the deadline, not after a timeout per byte."""
        deadline = time.monotonic() + self.timeout
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            self.heard = time.monotonic()
            sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
            chunks = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the answer took longer than {self.timeout}s")
                if sock is not None:
                    sock.settimeout(left)
                chunk = resp.read1(65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

    @staticmethod
    def content(raw):
        """The text of a chat-completions answer; anything else (no choices, null content) is a format error. Content
        given as a list of chunks (Mistral's Magistral models: a "thinking" chunk, then "text") is joined, its
        thinking put in <think> tags so the cache keeps it and visible_text leaves it out as any other's."""
        text = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
        if isinstance(text, list):
            text = "".join(chunk_text(part) for part in text)
        if not isinstance(text, str):
            raise TypeError(f"message content is {type(text).__name__}, not text")
        return text

    def ask(self, prompt):
        body = json.dumps({"model": self.model, "temperature": self.temperature,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt
            try:
                self.requests += 1
                return self.content(self._post(body, headers))
            except urllib.error.HTTPError as e:
                self.heard = time.monotonic()
                page = self.redact(e.read(65536).decode(errors="replace"))  # Gemini's quota details pass 300 bytes
                detail = page[:300]
                if e.code in (401, 403):
                    raise LLMFatal(f"{self.url} answered {e.code} ({self.redact(str(e.reason))}): check the API key "
                                   "(OPENAI_API_KEY or --llm-key-file) and that it may use this endpoint") from None
                if e.code == 400 and "temperature" in detail.lower():  # reasoning models (o1, o3, gpt-5) take only 1
                    raise LLMFatal(f"{self.url} answered 400: {self.model!r} refuses temperature {self.temperature:g}; "
                                   "give the one it takes with --llm-temperature (Make: "
                                   f"CORPUS_ARGS=\"--llm-temperature 1\"). Server said: {detail}") from None
                if e.code == 404 and "model" not in detail.lower():  # a page the server does not have
                    hint = "" if self.base.endswith("/v1") else (" OpenAI-compatible servers (vLLM, Ollama) serve "
                                                                 f"them under /v1: {self.base}/v1?")
                    said = detail[:100].strip()
                    raise LLMFatal(f"{self.url} answered 404 (server said: {said}): no chat completions at this "
                                   f"address.{hint} Check OPENAI_BASE_URL or --llm-base-url") from None
                if e.code == 404 or "model" in detail.lower() and e.code == 400:
                    raise LLMFatal(f"{self.url} answered {e.code}: model {self.model!r} not found? "
                                   f"Server said: {detail}") from None
                spent = spent_quota(page) if e.code == 429 else None
                if spent:  # no retry brings it back
                    raise LLMFatal(f"{self.url} answered 429, {spent}. The answers so far are cached; a rerun "
                                   f"resumes from them. Server said: {detail}") from None
                if e.code == 429 or e.code >= 500:
                    asked = asked_wait(e.headers, page)
                    if asked is not None and asked > MAX_RETRY_AFTER:
                        raise LLMFatal(f"{self.url} answered {e.code} and asks to wait {asked / 60:.0f} minutes "
                                       "before the next request (a daily limit?). The answers so far are cached; rerun "
                                       f"when it has passed. Server said: {detail}") from None
                    wait = max(wait, asked or 0)
                    error = f"HTTP {e.code}: {detail[:200]}"
                else:
                    raise LLMFatal(f"{self.url} answered {e.code}: {detail}") from None
            except (socket.timeout, TimeoutError) as e:
                error = f"timeout after {self.timeout}s ({e})"
            except urllib.error.URLError as e:
                if isinstance(e.reason, (socket.timeout, TimeoutError)):
                    error = f"timeout after {self.timeout}s"
                else:
                    error = self.redact(f"connection failed ({e.reason})")
            except (http.client.HTTPException, ConnectionError) as e:  # dropped mid-body, reset, closed early
                error = self.redact(f"connection broken ({type(e).__name__}: {e})")
            except (KeyError, IndexError, TypeError, ValueError) as e:  # not JSON, not UTF-8, null content or choices
                error = f"unexpected answer format ({type(e).__name__}: {str(e)[:200]})"
            if attempt < self.max_retries:
                time.sleep(wait)
        raise RuntimeError(f"{self.url}: no answer after {self.max_retries + 1} tries (last: {error})")


def plan_requests(classnames, model, cache, num_descriptors, cupl_answers, question=DESCRIPTOR_QUESTION):
    """The (kind, class, prompt, sample) jobs a run needs; those already cached are marked so."""
    jobs = []
    for c, name in enumerate(classnames):
        q = fill(question, num_descriptors, name)
        jobs.append(("descriptors", c, q, 0))
        for template in CUPL_QUESTIONS if cupl_answers else ():
            for s in range(cupl_answers):
                jobs.append(("cupl", c, template.format(c=name, a=article(name)), s))
    return [(job, cache.get(model, job[2], classnames[job[1]], job[3]) is not None) for job in jobs]


def generate(classnames, client, cache, num_descriptors=10, cupl_answers=0, concurrency=8, max_asks=3,
             question=DESCRIPTOR_QUESTION, progress=True):
    """Descriptors [C][<=M] and CuPL sentences [C][*] from the LLM, through the cache.

    A descriptor answer with fewer than M items is asked again (up to max_asks answers per class, with a hint
    to give exactly M lines); classes still short are returned in `short`.
    """
    from tqdm import tqdm
    model = client.model
    stats = dict(done=0, cached=0, failed=0, thinking=0)
    total = len(classnames) * (1 + 5 * cupl_answers)
    bar = tqdm(total=total, desc="llm", disable=not (progress and sys.stderr.isatty()))
    started = last_line = time.time()  # in a log file (no terminal): a line every 30 s instead of the bar
    lock = threading.Lock()
    fatal = threading.Event()  # set by the first answer that retrying cannot fix: no thread sends another request

    def answer(prompt, cls, sample):
        """The answer's text without a reasoning model's thinking (the cache keeps it whole)."""
        text = whole_answer(prompt, cls, sample)
        shown = visible_text(text)
        if shown != text:
            with lock:
                stats["thinking"] += 1
        return shown

    def whole_answer(prompt, cls, sample):
        cached = cache.get(model, prompt, classnames[cls], sample)
        if cached is not None:
            with lock:
                stats["cached"] += 1
            return cached
        if fatal.is_set():
            raise _Skipped
        first_try = time.monotonic()
        try:
            text = client.ask(prompt)
        except LLMFatal:
            fatal.set()
            raise
        except RuntimeError as e:  # out of retries
            # a wrong URL, no network, a server that died or hangs: each class would wait out its own retries, hours
            # for a thousand classes, before the run said so. A class the server keeps answering with an error
            # (others' answers arrive meanwhile) fails alone
            with cache.lock:
                never = not cache.answers  # nothing from this endpoint, in this run or in the cache
            if never:
                fatal.set()
                raise LLMFatal(f"{e}. This endpoint has answered nothing, in this run or in the cache, so no more "
                               "requests are sent: check it (OPENAI_BASE_URL or --llm-base-url), the network and the "
                               "model name") from None
            if client.heard is None or client.heard < first_try:
                fatal.set()
                raise LLMFatal(f"{e}. The endpoint has sent no answer, not even an error, for the "
                               f"{time.monotonic() - first_try:.0f} s of these tries: it stopped or cannot be "
                               f"reached (or each answer takes longer than --llm-timeout, {client.timeout:g} s), so "
                               "no more requests are sent. The answers so far are cached; a rerun resumes from "
                               "them") from None
            raise
        cache.put(model, prompt, classnames[cls], sample, text)
        with lock:
            stats["done"] += 1
        return text

    def descriptors_of(c):
        name = classnames[c]
        base = fill(question, num_descriptors, name)
        items = []
        for sample in range(max_asks):
            prompt = base if sample == 0 else base + RETRY_HINT.format(m=num_descriptors)
            for item in parse_list(answer(prompt, c, sample)):
                if item not in items:
                    items.append(item)
            if len(items) >= num_descriptors:
                break
        return items[:num_descriptors]

    def cupl_of(c):
        name = classnames[c]
        out = []
        for template in CUPL_QUESTIONS:
            for s in range(cupl_answers):
                out += split_sentences(answer(template.format(c=name, a=article(name)), c, s))
        return out

    descriptors, cupl = [None] * len(classnames), [[] for _ in classnames]
    failures = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(descriptors_of, c): ("descriptors", c) for c in range(len(classnames))}
        if cupl_answers:
            futures.update({pool.submit(cupl_of, c): ("cupl", c) for c in range(len(classnames))})
        try:
            for fut in as_completed(futures):
                kind, c = futures[fut]
                try:
                    result = fut.result()
                except LLMFatal:
                    raise
                except _Skipped:  # the fatal answer's own future is still to come, and is raised then
                    continue
                except RuntimeError as e:
                    stats["failed"] += 1
                    failures.append(f"{classnames[c]} ({kind}): {e}")
                    result = [] if kind == "cupl" else None
                if kind == "descriptors":
                    descriptors[c] = result
                else:
                    cupl[c] = result
                bar.update(1 if kind == "descriptors" else 5 * cupl_answers)
                bar.set_postfix(stats)
                if progress and bar.disable and time.time() - last_line >= 30:
                    last_line = time.time()
                    print(f"llm: {bar.n}/{total} answers ({stats}), {bar.n / (last_line - started):.1f}/s",
                          file=sys.stderr, flush=True)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    bar.close()
    for c, d in enumerate(descriptors):  # an answer with no list item in it is no usable answer either
        if d is not None and not d:
            failures.append(f"{classnames[c]} (descriptors): no list item in {max_asks} answers")
    short = [classnames[c] for c, d in enumerate(descriptors) if d is None or len(d) < num_descriptors]
    return dict(descriptors=[d or [] for d in descriptors], cupl=cupl, short=short, failures=failures,
                stats=stats, requests=client.requests)
