"""A chat-completions server on 127.0.0.1 for the LLM tests: list answers in several formats, and failures on
demand. `python tests/llm_server.py` serves until Ctrl-C (the 1,000-class measurement in docs/text.md uses it)."""
import email.utils
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FORMATS = (
    lambda items: "\n".join(f"{i + 1}. {t}" for i, t in enumerate(items)),
    lambda items: "Here are the features:\n" + "\n".join(f"{i + 1}) {t}" for i, t in enumerate(items)),
    lambda items: "\n".join(f"- {t}" for t in items),
    lambda items: "\n".join(f"* {t}" for t in items),
    lambda items: "\n".join(f"\u2022 {t}" for t in items),
    lambda items: "\n".join(items),
    lambda items: ("Sure! Here are features that help:\n\n" + "\n".join(f"{i + 1}. {t}" for i, t in enumerate(items))
                   + "\n\nThese features should help you tell it apart in a photo."),
)


def gemini_quota(kind):
    """The body of a 429 from Gemini's OpenAI-compatible endpoint (a list holding one error, as it sends): the quotas
    exceeded, a help link and a RetryInfo. 'daily' has spent the day's requests as well as the minute's; 'nofreetier'
    is a model the free tier has no quota for; 'perminute' is only the minute's."""
    ids = {"daily": ["GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                     "GenerateRequestsPerDayPerProjectPerModel-FreeTier"],
           "nofreetier": ["GenerateRequestsPerMinutePerProjectPerModel-FreeTier"],
           "perminute": ["GenerateRequestsPerMinutePerProjectPerModel-FreeTier"]}[kind]
    limit = 0 if kind == "nofreetier" else 10
    message = ("You exceeded your current quota, please check your plan and billing details. For more information "
               "on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for "
               f"metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: {limit}, "
               "model: gemini-2.5-pro\nPlease retry in 0.5s.")
    violations = [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                   "quotaId": i, "quotaDimensions": {"location": "global", "model": "gemini-2.5-pro"}} for i in ids]
    return [{"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.Help",
         "links": [{"description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": violations},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]}}]


class FakeLLM:
    """mode: 'ok', 'fail500' (two 500s per prompt first), '429' (one 429 with Retry-After first), 'hang' (first
    request per prompt sleeps past the client's timeout), 'short' (first answer has 6 items), '401', '404',
    'fixedtemperature' (a 400 for any temperature but 1, as OpenAI's reasoning models answer), 'nopage' (a 404 that
    names no model, as a server answers a path it does not serve),
    'broken' (classes named 'odd ...' always get a 500 whose text echoes the Authorization header), and first answers
    that are broken: 'nullcontent' (content null), 'nullchoices' (choices null), 'dropped' (the connection closes
    mid-body), 'badutf8' (bytes that are not UTF-8; 'badutf8always': every answer), 'trickle' (the answer comes a
    byte every 0.05 s), 'thinking' (a reasoning model's numbered thinking before the list, in <think> tags or after
    a chat template's opening tag; for 'odd ...' classes the first answer is cut off while thinking), 'chunks' (the
    content a list of a thinking chunk and a text chunk, as Mistral's Magistral models answer); after five answers,
    'quota' (429 insufficient_quota, as OpenAI answers an account out of credit) and 'tomorrow' (429 with a
    Retry-After date a day ahead), 'daily' and 'nofreetier' (Gemini's 429s for a spent daily quota and for a model
    the plan may not use), and 'dies' (every connection closed with no answer, as a server that stopped); 'perminute'
    (Gemini's 429 for its per-minute limit, no Retry-After but a RetryInfo of 1 s) first for every prompt."""

    def __init__(self, mode="ok", delay=0.0, hang_seconds=1.5):
        self.mode, self.delay, self.hang_seconds = mode, delay, hang_seconds
        self.requests, self.per_prompt, self.auth = 0, {}, set()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with fake.lock:
                    fake.requests += 1
                    n = fake.per_prompt[prompt] = fake.per_prompt.get(prompt, 0) + 1
                    fake.auth.add(self.headers.get("Authorization", ""))
                if fake.mode == "401":
                    return self.reply(401, {"error": {"message": "invalid api key"}})
                if fake.mode == "fixedtemperature" and body["temperature"] != 1:  # as OpenAI's reasoning models
                    return self.reply(400, {"error": {"message": f"Unsupported value: 'temperature' does not support "
                                                                 f"{body['temperature']} with this model. Only the "
                                                                 f"default (1) value is supported."}})
                if fake.mode == "nopage":  # a server whose chat completions are under another path
                    return self.reply(404, {"detail": "Not Found"})
                if fake.mode == "404":
                    return self.reply(404, {"error": {"message": f"The model {body['model']} does not exist"}})
                if fake.mode == "broken" and "odd" in prompt:
                    return self.reply(500, {"error": f"upstream failed for {self.headers.get('Authorization')}"})
                if fake.mode == "dies" and fake.requests > 5:
                    self.close_connection = True  # nothing sent: the client reads an empty reply
                    return
                if fake.mode == "quota" and fake.requests > 5:
                    quota = {"message": "You exceeded your current quota, please check your plan and billing "
                                        "details.", "type": "insufficient_quota", "code": "insufficient_quota"}
                    return self.reply(429, {"error": quota})
                if fake.mode == "tomorrow" and fake.requests > 5:
                    return self.reply(429, {"error": "daily limit reached"},
                                      {"Retry-After": email.utils.formatdate(time.time() + 86400, usegmt=True)})
                if fake.mode in ("daily", "nofreetier") and fake.requests > 5 or fake.mode == "perminute" and n == 1:
                    return self.reply(429, gemini_quota(fake.mode))
                if fake.mode == "fail500" and n <= 2:
                    return self.reply(500, {"error": "boom"})
                if fake.mode == "429" and n == 1:
                    return self.reply(429, {"error": "slow down"}, {"Retry-After": "1"})
                if fake.mode == "hang" and n == 1:
                    time.sleep(fake.hang_seconds)
                time.sleep(fake.delay)
                answer = {"choices": [{"message": {"role": "assistant", "content": fake.answer(prompt, n)}}]}
                if fake.mode == "chunks":
                    thinking = [{"type": "text", "text": "Okay. Candidates:\n1. its size\n2. where it is found"}]
                    answer["choices"][0]["message"]["content"] = [
                        {"type": "thinking", "thinking": thinking}, {"type": "text", "text": fake.answer(prompt, n)}]
                first = n == 1
                if fake.mode == "nullcontent" and first:
                    answer["choices"][0]["message"]["content"] = None
                if fake.mode == "nullchoices" and first:
                    answer = {"choices": None}
                if fake.mode == "dropped" and first:
                    return self.reply(200, answer, cut=20)
                if (fake.mode == "badutf8" and first) or fake.mode == "badutf8always":
                    return self.reply(200, answer, raw=b'{"choices": "\xff\xfe"}')
                if fake.mode == "trickle" and first:
                    return self.reply(200, answer, trickle=0.05)
                self.reply(200, answer)

            def reply(self, code, obj, headers=None, cut=None, raw=None, trickle=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    if cut is not None:  # part of the body, then the connection closes
                        self.wfile.write(data[:cut])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                    elif trickle is not None:
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            time.sleep(trickle)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, OSError):  # the client gave up (timeout tests)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, prompt, n):
        m = re.search(r"distinguishing (.+) in a photo", prompt)
        name = m.group(1) if m else prompt
        if not m:  # a CuPL question
            return "It is a picture of the thing. It shows the thing clearly."
        items = [f"feature {k} of {name}" for k in range(10)]
        if self.mode == "short" and "exactly" not in prompt:  # the client's re-ask asks for exactly M lines
            items = items[:6]
        answer = FORMATS[sum(map(ord, name)) % len(FORMATS)](items)
        if self.mode == "thinking":
            steps = "Okay, the user wants features. Let me list candidates:\n1. its size\n2. where it is found\n"
            if "odd" in name and "exactly" not in prompt:
                return "<think>\n" + steps  # cut off before the thinking ended
            return ("<think>\n" if sum(map(ord, name)) % 2 else "") + steps + "</think>\n\n" + answer
        return answer

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    with FakeLLM() as fake:
        print(f"serving on {fake.url}", flush=True)
        while True:
            time.sleep(1)
