"""Write the sample feedback log shipped as edgetune/assets/sample_feedback.jsonl.

Deterministic (fixed seed): running it again gives the same bytes, so the
asset in the repository is this script's output.

    python scripts/make_sample_feedback.py [--out PATH] [--conversations 300] [--seed 0]

The log is the kind a small product team has after a few weeks: a support
assistant for a cloud product, also asked coding, writing and data
questions, by five personas (plus users with no persona). It holds every
signal of the format (feedback-v1): thumbs up and down in all accepted
spellings, correction chains (some of three attempts), edited answers
(some unchanged), split-out feedback records (ratings, edits, comments),
conflicts, orphaned feedback, side-by-side comparisons (with ties), newer
versions of a conversation, repeated FAQ exchanges (duplicates), and
synthetic personal data (example.com addresses, 555 phone numbers, the Visa
test card, documentation IP ranges) for the PII rule.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "edgetune" / "assets" / "sample_feedback.jsonl"

SYSTEM_PROMPTS = [
    "You are the support assistant of Acme Cloud. Answer briefly and accurately.",
    "You are a helpful assistant for developers using Acme Cloud.",
    "You are Acme's internal analytics helper. Prefer concrete, runnable examples.",
]
PERSONAS = ["developer", "analyst", "support-agent", "novice", "manager"]

# Each scenario: question phrasings, a good answer, a wrong or weak first answer, what the
# user says to correct it, and a follow-up exchange to make longer conversations.
SCENARIOS = [
    dict(topic="account",
         asks=["How do I rotate an API key?", "How can I rotate my API key without downtime?",
               "What's the safe way to replace an API key?"],
         good="Create a second key under Settings > API keys, deploy it to your services, then revoke the old "
              "key once traffic has moved. Two keys can be active at the same time, so there is no downtime.",
         bad="Delete the key and create a new one.",
         fix="Deleting it first would break production. How do I do it without downtime?",
         follow=("Can I automate that?", "Yes: the `acme keys create` and `acme keys revoke KEY_ID` commands do "
                                        "the same from CI; run the revoke step only after your deploy succeeds.")),
    dict(topic="account",
         asks=["I forgot my password, how do I reset it?", "Reset my password please",
               "How do I get back into my account? I lost my password."],
         good="Use the \"Forgot password\" link on the sign-in page. We email a reset link that is valid for "
              "one hour; check your spam folder if it does not arrive within a few minutes.",
         bad="Contact support and we will send you your password.",
         fix="You store passwords in clear text?? There must be a self-service reset.",
         follow=("The email never came.", "Check that you typed the address you signed up with, and that "
                                          "mail from noreply@acme.example is not blocked; then request a new link.")),
    dict(topic="billing",
         asks=["Where can I download my invoices?", "How do I get a PDF invoice for last month?",
               "I need our invoices for accounting."],
         good="Go to Billing > Invoices. Each month has a PDF and a CSV download; owners and billing admins "
              "can also add an accounting email that receives every invoice automatically.",
         bad="Invoices are sent by post at the end of each quarter.",
         fix="We never got anything by post. Is there a download in the dashboard?",
         follow=("Can I change the company address on them?", "Yes, under Billing > Details; the change "
                                                              "applies to invoices issued after you save it.")),
    dict(topic="billing",
         asks=["What happens if I downgrade from Pro to Free?", "If we downgrade, do we lose data?",
               "Downgrading plan: what are the consequences?"],
         good="Your data stays. At the end of the billing period, projects over the Free limits become "
              "read-only until you delete some or upgrade again; nothing is deleted automatically.",
         bad="All projects beyond the first are deleted immediately.",
         fix="That sounds wrong, the pricing page says data is kept. Please check.",
         follow=("Do we get a refund for the rest of the month?", "No partial refunds: Pro stays active until "
                                                                  "the end of the period you paid for.")),
    dict(topic="infra",
         asks=["Why am I getting HTTP 429 from the API?", "What does error 429 mean in Acme Cloud?",
               "Our jobs fail with 429 Too Many Requests"],
         good="429 means you hit the rate limit (by default 100 requests per second per key). Retry after the "
              "number of seconds in the `Retry-After` header, with exponential backoff, or ask for a higher limit.",
         bad="429 means your API key is invalid.",
         fix="No, an invalid key gives 401. 429 is something else.",
         follow=("Can I see how close I am to the limit?", "Every response carries `X-RateLimit-Remaining` and "
                                                           "`X-RateLimit-Reset` headers.")),
    dict(topic="infra",
         asks=["How do I export all my data?", "Is there a way to export everything before we leave?",
               "Data export: how?"],
         good="Run `acme export --all --out backup.tar.gz`, or use Settings > Export for a download link. The "
              "archive holds every project as JSON plus the uploaded files.",
         bad="Exports are not supported; you have to copy the data by hand.",
         fix="Really? GDPR says you must offer an export.",
         follow=("How long does it take?", "Usually minutes; large accounts can take a few hours, and you get "
                                           "an email when the archive is ready.")),
    dict(topic="security",
         asks=["How do I turn on two-factor authentication?", "Enable 2FA for my account",
               "Can I require 2FA for my whole team?"],
         good="Under Profile > Security choose \"Enable two-factor\" and scan the QR code with an authenticator "
              "app. Organisation owners can require it for everyone under Organisation > Security.",
         bad="2FA is only available by SMS.",
         fix="I don't want SMS, it is not safe. Is an authenticator app possible?",
         follow=("What if I lose my phone?", "Use one of the recovery codes shown when you enabled 2FA, then "
                                             "set it up again on the new phone.")),
    dict(topic="python",
         asks=["Write code that prints hello.", "Python: print hello world", "Show me hello world in Python"],
         good="print('hello')",
         bad="print 'hello'",
         fix="No, you used Python 2, use Python 3.",
         follow=("And read a name from the user?", "name = input('Your name: ')\nprint(f'hello {name}')")),
    dict(topic="python",
         asks=["How do I reverse a list in Python?", "Reverse a Python list", "python reverse list without loop"],
         good="Use `items[::-1]` for a reversed copy, or `items.reverse()` to reverse it in place.",
         bad="Use `reversed(items)`, which returns the reversed list.",
         fix="reversed() gives me an iterator, not a list.",
         follow=("Which is faster?", "`items.reverse()` does not copy, so it is the cheapest when you do not "
                                     "need the original order any more.")),
    dict(topic="python",
         asks=["How do I read a CSV file with pandas?", "Load a CSV into a DataFrame",
               "pandas: open data.csv"],
         good="import pandas as pd\ndf = pd.read_csv('data.csv')\nprint(df.head())",
         bad="import pandas as pd\ndf = pd.open('data.csv')",
         fix="pd.open does not exist, I get an AttributeError.",
         follow=("The file uses semicolons.", "Pass the separator: `pd.read_csv('data.csv', sep=';')`.")),
    dict(topic="sql",
         asks=["Count orders per customer in SQL", "SQL: number of orders by customer",
               "How many orders does each customer have? (SQL)"],
         good="SELECT customer_id, COUNT(*) AS orders\nFROM orders\nGROUP BY customer_id\nORDER BY orders DESC;",
         bad="SELECT customer_id, COUNT(*) FROM orders;",
         fix="That fails: customer_id must appear in the GROUP BY clause.",
         follow=("Only customers with more than 5?", "Add `HAVING COUNT(*) > 5` after the GROUP BY.")),
    dict(topic="git",
         asks=["How do I undo my last commit but keep the changes?", "git: undo last commit, keep my edits",
               "Undo a commit I haven't pushed"],
         good="`git reset --soft HEAD~1` removes the commit and keeps its changes staged.",
         bad="`git reset --hard HEAD~1`",
         fix="--hard deleted my changes last time! I want to keep them.",
         follow=("And if I already pushed it?", "Then prefer `git revert HEAD`, which adds a new commit that "
                                                "undoes it without rewriting shared history.")),
    dict(topic="javascript",
         asks=["How do I debounce a function in JavaScript?", "JS debounce example",
               "Write a debounce helper in JS"],
         good="function debounce(fn, ms) {\n  let t;\n  return (...args) => {\n    clearTimeout(t);\n"
              "    t = setTimeout(() => fn(...args), ms);\n  };\n}",
         bad="function debounce(fn, ms) {\n  return () => setTimeout(fn, ms);\n}",
         fix="That runs fn every time, it never cancels the earlier call.",
         follow=("Does it keep `this`?", "Not with an arrow function; use `function (...args)` and "
                                         "`fn.apply(this, args)` if the callback needs `this`.")),
    dict(topic="writing",
         asks=["Summarise our refund policy in one line.", "One-sentence version of the refund policy?",
               "Give me a short summary of refunds"],
         good="Refunds are possible within 30 days of purchase, to the original payment method.",
         bad="Refunds are possible.",
         fix="Too vague, mention the 30 days.",
         follow=("Now make it friendlier.", "Changed your mind? You can get a full refund within 30 days of "
                                            "purchase, back to the card you paid with.")),
    dict(topic="writing",
         asks=["Rewrite this more politely: 'Send me the report now.'",
               "Make this email line polite: send me the report now",
               "Soften: 'Send me the report now.'"],
         good="Could you please send me the report when you have a moment today? Thank you!",
         bad="SEND ME THE REPORT NOW, PLEASE.",
         fix="That's even ruder. I want it polite.",
         follow=("Shorter?", "Could you send me the report today, please?")),
    dict(topic="writing",
         asks=["Translate 'Where is the train station?' to French.", "French for: where is the train station?",
               "How do you say 'where is the train station' in French?"],
         good="Où est la gare ?",
         bad="Où est la station de train ?",
         fix="Nobody says that in France, it sounds translated.",
         follow=("And in German?", "Wo ist der Bahnhof?")),
    dict(topic="analytics",
         asks=["What is a p-value, simply?", "Explain p-value to a manager", "p-value in one paragraph?"],
         good="Assuming there is no real effect, the p-value is the probability of seeing a result at least as "
              "extreme as yours. A small value (say below 0.05) means the data would be surprising if there "
              "were no effect; it is not the probability that the effect is real.",
         bad="The p-value is the probability that your hypothesis is true.",
         fix="I read that this is the classic misinterpretation. Can you correct it?",
         follow=("So is 0.049 very different from 0.051?", "No. The 0.05 line is a convention; report the value "
                                                           "and the effect size rather than only pass/fail.")),
    dict(topic="analytics",
         asks=["How do I compute a 7-day rolling average in pandas?", "pandas rolling mean over a week",
               "7 day moving average pandas"],
         good="df['avg_7d'] = df['value'].rolling(window=7, min_periods=1).mean()",
         bad="df['avg_7d'] = df['value'].mean(7)",
         fix="mean(7) is not a window, the result is a single number.",
         follow=("My dates have gaps.", "Use a time-based window on a DatetimeIndex: "
                                        "`df.set_index('date')['value'].rolling('7D').mean()`.")),
    dict(topic="general",
         asks=["What is the capital of Australia?", "Capital city of Australia?", "Australia's capital?"],
         good="Canberra.",
         bad="Sydney.",
         fix="That's the largest city, not the capital.",
         follow=("Since when?", "Canberra was chosen in 1908 as a compromise between Sydney and Melbourne, and "
                                "Parliament moved there in 1927.")),
    dict(topic="general",
         asks=["Explain DNS in one sentence.", "What does DNS do, briefly?", "DNS in a sentence?"],
         good="DNS translates human-readable domain names such as example.com into the IP addresses computers "
              "use to reach each other.",
         bad="DNS is the protocol that encrypts web traffic.",
         fix="That's TLS, not DNS.",
         follow=("What is a TTL?", "How long, in seconds, resolvers may cache a DNS answer before asking again.")),
    dict(topic="general",
         asks=["What's the difference between HTTP 404 and 410?", "404 vs 410?", "When should I return 410?"],
         good="404 Not Found says nothing about the future; 410 Gone says the resource was removed on purpose "
              "and will not come back, so clients and search engines can forget it.",
         bad="They are the same; 410 is just the older code.",
         fix="They are not the same, 410 means permanently gone.",
         follow=("Which is better for SEO?", "Search engines drop a 410 page a little faster than a 404; either "
                                             "is fine for pages that are really gone.")),
    dict(topic="infra",
         asks=["How do I set an environment variable for my Acme function?", "Env vars in Acme functions?",
               "Where do I configure secrets for a function?"],
         good="Run `acme functions config set NAME=value --function my-fn`, or use the Variables tab of the "
              "function. Mark secrets as secret so they are encrypted and hidden in logs.",
         bad="Put them in the code; functions cannot read environment variables.",
         fix="Hard-coding secrets is a terrible idea. There has to be a config option.",
         follow=("Do I need to redeploy?", "Yes, the new values apply from the next deployment.")),
]

PII_SNIPPETS = [
    "You can reach me at {name}@example.com.",
    "My phone is +1 415 555 {n:04d} if that helps.",
    "Call me on (212) 555-{n:04d}.",
    "The card on file is 4111 1111 1111 1111.",
    "Our server is 192.0.2.{ip} and the gateway 198.51.100.{ip2}.",
    "Please cc {name}.{last}@example.org.",
]
NAMES = ["jane", "omar", "li", "sara", "tom", "ines", "raj", "mia", "ken", "ada"]
LASTS = ["doe", "khan", "wei", "lopez", "smith", "novak"]
OPENERS = ["", "", "", "Hi! ", "Quick question: ", "Hello, ", "Sorry to bother you. ", "Hey, "]
THANKS = ["Perfect, thanks.", "Thanks!", "Great, that worked.", "ok", "Thank you, that helps."]
UP = ["up", "up", "up", True, 1]
DOWN = ["down", "down", -1, False, 0]
COMMENTS = ["exactly what I needed", "wrong", "too long", "great example", "outdated", "clear"]


class SampleWriter:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.records: list[dict] = []
        self.split_out: list[dict] = []
        self.n = 0

    def ask(self, scenario: dict) -> str:
        r = self.rng
        text = r.choice(OPENERS) + r.choice(scenario["asks"])
        if r.random() < 0.12:
            snippet = r.choice(PII_SNIPPETS)
            text += " " + snippet.format(name=r.choice(NAMES), last=r.choice(LASTS), n=r.randrange(10000),
                                         ip=r.randrange(1, 255), ip2=r.randrange(1, 255))
        return text

    def conversation(self, kind: str) -> dict:
        r = self.rng
        self.n += 1
        cid = f"conv-{self.n:04d}"
        scenario = r.choice(SCENARIOS)
        msgs: list[dict] = []

        def add(role, content, **extra):
            msgs.append({"id": f"m{len(msgs) + 1}", "role": role, "content": content, **extra})
            return msgs[-1]

        if r.random() < 0.6:
            add("system", r.choice(SYSTEM_PROMPTS))
        add("user", self.ask(scenario))
        if kind == "up":
            add("assistant", scenario["good"], feedback={"rating": r.choice(UP)})
        elif kind == "down":
            add("assistant", scenario["bad"], feedback={"rating": r.choice(DOWN)})
            add("user", scenario["fix"])
        elif kind == "chain":
            bad = add("assistant", scenario["bad"])
            if r.random() < 0.7:
                bad["feedback"] = {"rating": r.choice(DOWN)}
            add("user", scenario["fix"])
            if r.random() < 0.2:  # a second failed attempt: a three-step chain
                second = add("assistant", scenario["bad"].rstrip(".") + ", as I said.", corrects=bad["id"])
                add("user", "Still wrong. " + scenario["fix"])
                bad = second
            final = add("assistant", scenario["good"], corrects=bad["id"])
            if r.random() < 0.6:
                final["feedback"] = {"rating": r.choice(UP)}
            elif r.random() < 0.1:
                final["feedback"] = {"rating": "down"}  # the correction did not help either
        elif kind == "edit":
            weak = add("assistant", scenario["bad"])
            same = r.random() < 0.15  # an "edit" that only changes whitespace
            weak["feedback"] = {"edited_content": "  " + scenario["bad"] + " " if same else scenario["good"]}
            if r.random() < 0.5:
                weak["feedback"]["comment"] = r.choice(COMMENTS)
        else:  # no signal
            add("assistant", scenario["good"])
        if r.random() < 0.45:  # a second exchange
            question, answer = scenario["follow"]
            add("user", question)
            second = add("assistant", answer)
            roll = r.random()
            if roll < 0.35:
                second["feedback"] = {"rating": r.choice(UP)}
            elif roll < 0.45:
                second["feedback"] = {"rating": r.choice(DOWN)}
        if r.random() < 0.5:
            add("user", r.choice(THANKS))
        record = {"type": "conversation", "conversation_id": cid,
                  "timestamp": f"2026-10-{1 + self.n % 28:02d}T{8 + self.n % 10:02d}:{self.n % 60:02d}:00Z",
                  "metadata": {"app": "helpdesk", "topic": scenario["topic"]}, "messages": msgs}
        if r.random() < 0.85:
            record["persona"] = r.choices(PERSONAS, weights=[30, 20, 15, 25, 10])[0]
        self.maybe_split_out(record)
        return record

    def maybe_split_out(self, record: dict) -> None:
        """Feedback logged apart from the conversation, as observability tools export it."""
        r = self.rng
        assistant = [m for m in record["messages"] if m["role"] == "assistant"]
        if r.random() > 0.12:
            return
        target = r.choice(assistant)
        fb = {"type": "feedback", "conversation_id": record["conversation_id"], "message_id": target["id"],
              "timestamp": record["timestamp"].replace(":00Z", ":30Z")}
        rating = target.get("feedback", {}).get("rating")
        roll = r.random()
        if rating is not None and roll < 0.25:  # a second opinion that contradicts: a conflict
            fb["rating"] = "down" if rating in UP else "up"
        elif roll < 0.7:
            fb["rating"] = r.choice(UP + DOWN)
            if r.random() < 0.4:
                fb["comment"] = r.choice(COMMENTS)
        else:
            fb["edited_content"] = target["content"] + " (Edited by the support team: see the docs for details.)"
        self.split_out.append(fb)

    def comparison(self, i: int) -> dict:
        r = self.rng
        scenario = r.choice(SCENARIOS)
        good, bad = {"id": "a", "content": scenario["good"]}, {"id": "b", "content": scenario["bad"]}
        responses = [good, bad] if r.random() < 0.5 else [{**bad, "id": "a"}, {**good, "id": "b"}]
        preferred = "tie" if r.random() < 0.15 else next(x["id"] for x in responses if x["content"] == scenario["good"])
        record = {"type": "comparison", "comparison_id": f"cmp-{i:03d}",
                  "prompt": [{"role": "user", "content": self.ask(scenario)}], "responses": responses,
                  "preferred": preferred}
        if r.random() < 0.7:
            record["persona"] = r.choice(PERSONAS)
        return record


def make_log(conversations: int, seed: int) -> list[dict]:
    w = SampleWriter(seed)
    kinds = ["up"] * 35 + ["down"] * 12 + ["chain"] * 18 + ["edit"] * 10 + ["none"] * 25
    lines = [w.conversation(w.rng.choice(kinds)) for _ in range(conversations)]
    # A few newer versions: the same conversation logged again with one more exchange.
    for original in w.rng.sample(lines, k=max(1, conversations // 60)):
        newer = json.loads(json.dumps(original))
        n = len(newer["messages"])
        newer["messages"] += [{"id": f"m{n + 1}", "role": "user", "content": "One more thing: is this documented?"},
                              {"id": f"m{n + 2}", "role": "assistant", "content": "Yes, see docs.acme.example.",
                               "feedback": {"rating": "up"}}]
        lines.append(newer)
    lines += [w.comparison(i) for i in range(1, conversations // 7 + 1)]
    orphans = [{"type": "feedback", "conversation_id": "conv-deleted-1", "message_id": "m2", "rating": "up"},
               {"type": "feedback", "conversation_id": lines[0]["conversation_id"], "message_id": "m99",
                "rating": "down", "comment": "message id from an old client"},
               {"type": "feedback", "conversation_id": lines[1]["conversation_id"], "message_id": "m1",
                "rating": "up"}]
    # Interleave split-out feedback into the log at random places after the first third.
    feedback = w.split_out + orphans
    out = list(lines)
    for fb in feedback:
        out.insert(w.rng.randrange(len(out) // 3, len(out) + 1), fb)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--conversations", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    records = make_log(args.conversations, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
