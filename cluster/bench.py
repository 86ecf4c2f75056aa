"""`specserve bench`: drive OpenAI-compatible servers with seeded workloads and report latency/throughput.

Each target gets warmed up, then one pass per (workload, concurrency): a fixed pool of N workers pulls
requests from a queue, so the server sees exactly N streams in flight. Requests are streamed so time to
first token and the gaps between chunks can be measured on the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import urlparse

import httpx

from specserve.cluster.bench_grpc import GrpcBenchClient

Messages = list[dict[str, str]]

DEFAULT_URL = "http://127.0.0.1:8000"

# ---------------------------------------------------------------------------------------------------------
# Workloads: pure functions of (n, seed). Each kind seeds its own RNG from a string so the streams of
# different kinds (and the warmup prompts) never coincide for the same --seed.
# ---------------------------------------------------------------------------------------------------------

_CHAT_QUESTIONS = [
    "What is the difference between a process and a thread?",
    "Explain why the sky looks blue during the day.",
    "Write a haiku about a rainy Monday morning.",
    "Give three tips for keeping houseplants alive through the winter.",
    "How does a hash table deal with collisions?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What causes the seasons on Earth?",
    "Translate 'Where is the train station?' into French and into Spanish.",
    "Suggest a name for a small bakery that specializes in sourdough bread.",
    "Why do cats purr?",
    "What is a good way to start learning the guitar as an adult?",
    "Explain compound interest with a simple numeric example.",
    "List four renewable sources of energy.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Write one polite sentence declining a meeting invitation.",
    "How do vaccines teach the immune system to recognize a virus?",
    "What does the Python keyword 'yield' do?",
    "Describe the taste of a ripe mango to someone who has never eaten one.",
    "Convert 72 degrees Fahrenheit to Celsius and show the steps.",
    "What is the difference between weather and climate?",
    "Give me a short motivational line for a long study session.",
    "Why is the ocean salty while most rivers are not?",
    "Explain what a CPU cache is in plain language.",
    "What are the rules of tic-tac-toe?",
    "Recommend a quick warm-up routine before a morning run.",
    "How do bees turn nectar into honey?",
    "Write a limerick about a forgetful robot.",
    "What is the Pythagorean theorem used for in everyday life?",
    "Explain the difference between TCP and UDP.",
    "What should I pack for a weekend camping trip in the mountains?",
    "How does a refrigerator keep food cold?",
    "Name three famous paintings and the artists who made them.",
    "What is photosynthesis, and why does it matter?",
    "Give a one-paragraph history of the bicycle.",
    "How can I make my morning coffee taste less bitter?",
    "What is recursion? Show a tiny example.",
    "Why do leaves change color in autumn?",
    "What does inflation mean for a household budget?",
    "Write a two-line rhyme about the moon.",
    "What is the difference between RAM and disk storage?",
    "How do noise-cancelling headphones work?",
    "Suggest a vegetarian dinner that takes less than thirty minutes to cook.",
    "Why does bread go stale?",
    "What is a black hole, in a few sentences?",
]
_CHAT_STYLES = ["", "Briefly: ", "In simple terms: ", "Explain it to a ten-year-old. ", "Answer like an expert. "]
_CHAT_SUFFIXES = ["", " Keep it short.", " Use at most three sentences.", " Include one concrete example."]

_FIRST_NAMES = [
    "Amara", "Ben", "Chiara", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kwame", "Leila",
    "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Samir", "Tess", "Umar", "Vera", "Wei", "Yusuf",
]

# House rules appended to every tenant's system prompt, like a platform-wide policy block.
_SHARED_RULES = (
    "General rules for every conversation. Be concise and friendly, and answer in the language the user "
    "writes in. Never invent order numbers, prices, dates or policy details that are not written in these "
    "instructions; if you do not know something, say so and offer to connect the user with a human agent. "
    "Do not ask for passwords, full card numbers or security codes, and if a user shares them, tell them to "
    "change them and do not repeat them back. Keep answers under about one hundred and fifty words unless "
    "the user asks for step-by-step instructions. Use numbered steps for procedures and plain sentences "
    "otherwise. End every answer by asking whether there is anything else you can help with."
)

_TENANTS: list[dict[str, Any]] = [
    {
        "name": "Northwind Outfitters",
        "ident": "order NW-{}",
        "system": (
            "You are Trailhead, the customer support assistant of Northwind Outfitters, an online retailer of "
            "hiking, camping and climbing gear based in Portland, Oregon. Customers contact you about orders, "
            "returns, product advice and warranty claims. Shipping: standard shipping is free on orders over "
            "75 dollars and takes three to six business days; express shipping costs 18 dollars and takes one "
            "to two business days. Orders placed before noon Pacific time ship the same day. We ship to the "
            "United States and Canada only. Returns: unused items can be returned within 60 days for a full "
            "refund; used items can be returned within 30 days for store credit if they are clean and "
            "undamaged. Sleeping bags and tents must be returned dry. Return labels are free for members of "
            "the Northwind Trail Club and cost 7 dollars otherwise. Warranty: our house brand, Northwind "
            "Basecamp, carries a lifetime warranty against manufacturing defects, but not against normal wear, "
            "accidents or misuse. For other brands, refer the customer to the manufacturer warranty and offer "
            "to look up the contact details. Product advice: ask about the season, the expected temperatures "
            "and the length of the trip before recommending a sleeping bag or a tent. Recommend a rating at "
            "least five degrees colder than the coldest night expected. Never recommend climbing equipment for "
            "a purpose it is not certified for, and remind customers that ropes and harnesses should be retired "
            "after a serious fall. Gift cards never expire and cannot be exchanged for cash."
        ),
        "questions": [
            "Where is my order? It was supposed to arrive yesterday.",
            "Can I return a tent I used once on a rainy weekend?",
            "Which sleeping bag would you suggest for a trip to the Rockies in October?",
            "The zipper on my Basecamp backpack broke after two years. Is that covered?",
            "Do you ship to Alaska, and how long would it take?",
            "How much does express shipping cost if my order is 60 dollars?",
            "I want to exchange hiking boots for a bigger size. How do I do that?",
            "Is a 30 degree sleeping bag warm enough for camping near freezing?",
            "Can I use my gift card together with a discount code?",
            "My climbing rope caught a long fall. Can I keep using it?",
            "Do Trail Club members get free return labels?",
            "What is the difference between your store credit and a refund?",
        ],
    },
    {
        "name": "Maple Grove Family Clinic",
        "ident": "patient ID MG{}",
        "system": (
            "You are the front-desk assistant of Maple Grove Family Clinic, a primary care practice with four "
            "physicians and two nurse practitioners. You help patients with appointments, opening hours, "
            "billing questions, prescriptions refills and paperwork. You are not a clinician: never diagnose, "
            "never suggest medication doses, and never tell a patient that a symptom is harmless. If a patient "
            "describes chest pain, trouble breathing, sudden weakness, severe bleeding or thoughts of self-harm, "
            "tell them to call the emergency number immediately and stop the conversation about scheduling. "
            "Opening hours are Monday to Friday from 8 in the morning to 6 in the evening, and Saturday from 9 "
            "to 1. Same-day sick visits are released at 8 each morning and are usually gone by 10. Routine "
            "checkups are booked up to three months ahead. Cancellations need 24 hours notice, otherwise a fee "
            "of 40 dollars applies, which can be waived once per year. Prescription refill requests are "
            "processed within two business days; controlled substances always need a visit. New patients must "
            "bring a photo ID, their insurance card and a list of current medications, and should arrive fifteen "
            "minutes early to fill in forms. We accept most major insurance plans; patients should confirm "
            "coverage with their insurer before the visit. Medical records requests are handled by the records "
            "office and take up to ten business days. Lab results are posted in the patient portal once a "
            "physician has reviewed them, usually within three days."
        ),
        "questions": [
            "Can I get a same-day appointment for a sore throat?",
            "I need to cancel my appointment tomorrow morning. Will I be charged?",
            "How long does a prescription refill usually take?",
            "What should I bring to my first visit as a new patient?",
            "Are you open on Saturdays?",
            "When will my blood test results show up in the portal?",
            "How do I request a copy of my medical records?",
            "Can I book a yearly checkup for sometime next month?",
            "Do you accept my insurance plan from a small regional insurer?",
            "I missed an appointment last week by accident. Can the fee be waived?",
            "Can a nurse practitioner see my child for a vaccination?",
        ],
    },
    {
        "name": "Ledgerly",
        "ident": "workspace LG-{}",
        "system": (
            "You are the in-app help assistant of Ledgerly, a bookkeeping and invoicing application for "
            "freelancers and small businesses. Users ask how to use features, why numbers look wrong, and how "
            "their subscription works. Plans: Starter costs 12 dollars a month and includes one user, 20 "
            "invoices a month and one bank connection. Growth costs 29 dollars a month and includes three users, "
            "unlimited invoices, five bank connections and recurring invoices. Pro costs 59 dollars a month and "
            "adds payroll in supported regions, multi-currency accounts and an accountant seat. Annual billing "
            "saves two months. Plans can be changed at any time; upgrades apply immediately and downgrades at "
            "the end of the billing period. Bank connections sync every night; users can trigger a manual sync "
            "from the Banking page up to five times a day. If a transaction appears twice, it is usually because "
            "a statement was imported manually while the bank feed was active, and the duplicate can be merged "
            "from the transaction menu. Invoices can be customized with a logo, colors and payment terms, and "
            "can be paid by card or bank transfer through the payment link. Reports include profit and loss, "
            "balance sheet, cash flow and sales tax summary, and can be exported to PDF or CSV. You cannot "
            "give tax or legal advice: explain what the software does and suggest talking to an accountant for "
            "anything about what should be filed. Data exports are available from Settings under Data."
        ),
        "questions": [
            "Why is one of my bank transactions showing up twice?",
            "How do I add my logo to invoices?",
            "What is the difference between the Growth and Pro plans?",
            "If I downgrade today, when does the lower price start?",
            "Can I send recurring invoices on the Starter plan?",
            "How do I export my profit and loss report to a spreadsheet?",
            "My bank feed has not updated since yesterday. What can I do?",
            "Can my accountant get access to my books?",
            "Should I register for sales tax? My revenue just passed a threshold.",
            "How many invoices can I send per month on Starter?",
            "How do clients pay an invoice by card?",
        ],
    },
    {
        "name": "Orbit Fiber",
        "ident": "account OF{}",
        "system": (
            "You are the technical support assistant of Orbit Fiber, a home internet provider that offers fiber "
            "connections at 300 megabits, 1 gigabit and 2 gigabits per second. Most questions are about slow "
            "speeds, Wi-Fi coverage, outages, equipment and billing. Troubleshooting order for slow internet: "
            "first ask whether the problem happens on a wired connection or only over Wi-Fi. If only over "
            "Wi-Fi, suggest moving closer to the router, using the 5 gigahertz network, and checking how many "
            "devices are streaming. If it also happens on a wired connection, ask the customer to restart the "
            "optical terminal and the router, waiting two minutes between them, and then run a speed test at "
            "speed.orbitfiber.example. Speeds up to 10 percent below the plan are normal over a wired link. "
            "Lights on the optical terminal: green means connected, blinking green means starting, red means no "
            "signal from the fiber line, which needs a technician. Outages are listed on the status page; if "
            "there is an outage in the customer's area, give the estimated repair time from the status page "
            "and do not schedule a technician. Technician visits are free when the fault is on our side and "
            "cost 60 dollars if the problem is in the customer's own wiring or devices. Mesh Wi-Fi extenders "
            "can be rented for 5 dollars a month. Bills are issued on the first of each month and due on the "
            "fifteenth; a late fee of 8 dollars applies after that. Plan changes take effect within one hour."
        ),
        "questions": [
            "My internet is really slow tonight. What should I check first?",
            "There is a red light on the box on my wall. What does it mean?",
            "Is there an outage in my area right now?",
            "I pay for 1 gigabit but my speed test shows 910 megabits. Is that normal?",
            "My Wi-Fi does not reach the upstairs bedroom. Any suggestions?",
            "How much does a technician visit cost?",
            "When is my bill due this month?",
            "How quickly does an upgrade to the 2 gigabit plan take effect?",
            "Can I rent a mesh extender, and what does it cost?",
            "My video calls keep freezing even though the speed test looks fine.",
            "I restarted the router and nothing changed. What next?",
        ],
    },
]
for _t in _TENANTS:
    _t["system"] = _t["system"] + "\n\n" + _SHARED_RULES

_PASSAGES = [
    [
        "The lighthouse on the northern cape was built in 1871 from granite quarried a few miles inland.",
        "For almost a century, a keeper and his family lived in the small stone house at its base.",
        "Every evening the keeper climbed one hundred and twelve steps to light the lamp and wind the clockwork.",
        "In storms he stayed awake all night, watching the beam sweep across the black water.",
        "The light was automated in 1968, and the last keeper moved to the village below.",
        "Today the house is a museum, and visitors can climb the stairs on summer afternoons.",
    ],
    [
        "To make a simple loaf of bread, mix flour, water, salt and a little yeast in a large bowl.",
        "Knead the dough for about ten minutes, until it feels smooth and springs back when pressed.",
        "Cover the bowl and let the dough rise in a warm place until it has doubled in size.",
        "Shape it gently into a round, place it on a floured tray and let it rise again for an hour.",
        "Bake it in a hot oven for thirty five minutes, until the crust is deep brown.",
        "Let the loaf cool completely before slicing, or the inside will be gummy.",
    ],
    [
        "The meeting on Thursday will start at half past nine in the large conference room.",
        "Please bring the quarterly figures for your team, printed or on a laptop.",
        "We will first review the budget, then discuss the hiring plan for the next six months.",
        "Each team lead will have ten minutes to present their priorities and open risks.",
        "Lunch will be served at noon, and the afternoon is reserved for planning sessions in small groups.",
        "If you cannot attend, send a short written update to the organizer by Wednesday evening.",
    ],
    [
        "Honeybees live in colonies that can contain tens of thousands of workers and a single queen.",
        "The workers are all female, and their jobs change as they grow older.",
        "Young bees clean the cells and feed the larvae, while older bees guard the entrance.",
        "The oldest workers become foragers and fly out to collect nectar and pollen from flowers.",
        "A forager that finds a rich patch of flowers performs a dance to tell the others where it is.",
        "In a single summer, a strong colony can store far more honey than it needs for the winter.",
    ],
    [
        "Before you leave for a long hike, tell someone where you are going and when you expect to be back.",
        "Check the weather forecast, and turn around if the sky looks threatening.",
        "Carry more water than you think you need, along with a map, a light and a warm layer.",
        "Stay on marked trails, especially when fog or snow makes landmarks hard to see.",
        "If you get lost, stop, stay calm and try to retrace your steps to the last point you recognize.",
        "Most rescues end well because the hiker stayed put and someone knew where to look.",
    ],
    [
        "The library will close for renovations from the first of March until the end of May.",
        "During this time, books can be returned through the drop box next to the side entrance.",
        "A temporary branch will open in the community center on Elm Street, with a smaller collection.",
        "Members can still reserve books online and pick them up at the temporary branch.",
        "The renovation will add a reading garden, new study rooms and a larger children's section.",
        "We apologize for the inconvenience and look forward to welcoming you back in the summer.",
    ],
    [
        "A compiler translates a program written in a high-level language into machine code.",
        "It usually works in several stages, starting by splitting the source text into tokens.",
        "The tokens are then parsed into a tree that reflects the structure of the program.",
        "Later stages check types, simplify the tree and perform optimizations such as removing dead code.",
        "Finally, the code generator emits instructions for the target processor.",
        "Good error messages are among the hardest parts of a compiler to get right.",
    ],
    [
        "Our grandmother kept a small garden behind the house, with tomatoes, beans and a row of sunflowers.",
        "Every morning in summer she walked between the beds with a watering can and a pair of old scissors.",
        "She talked to the plants as if they were neighbors, asking how they had slept.",
        "In August the kitchen smelled of tomato sauce, which she bottled in dozens of glass jars.",
        "We ate the last of those jars in the middle of winter, when the garden was under snow.",
        "Each spoonful tasted like a warm afternoon in the garden.",
    ],
]

_COPY_INSTRUCTIONS = [
    ("Repeat the following text exactly, without adding or removing anything:\n\n{}", False),
    ("Copy this passage word for word:\n\n{}", False),
    ("Fix the typos in the following text. Return only the corrected text and change nothing else:\n\n{}", True),
    ("Rewrite the following text with correct spelling, keeping every sentence in the same order:\n\n{}", True),
]


def _rng(kind: str, seed: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and Python versions.
    return random.Random(f"specserve-bench:{kind}:{seed}")


def _take(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)] if items else []


def _chat(n: int, rng: random.Random) -> list[Messages]:
    combos = [(s, q, x) for q in _CHAT_QUESTIONS for s in _CHAT_STYLES for x in _CHAT_SUFFIXES]
    rng.shuffle(combos)  # about 900 distinct prompts before any repeat
    return [[{"role": "user", "content": f"{s}{q}{x}"}] for s, q, x in _take(combos, n)]


def chat_workload(n: int, seed: int = 0) -> list[Messages]:
    """Short single-turn chat prompts (roughly 10-40 tokens)."""
    return _chat(n, _rng("chat", seed))


def tenant_system_prompt(i: int, reference_passages: int = 4) -> str:
    """Tenant i's system prompt: its instructions, then reference material (as a RAG-style assistant carries)."""
    refs = [" ".join(_PASSAGES[(2 * i + k) % len(_PASSAGES)]) for k in range(reference_passages)]
    return _TENANTS[i]["system"] + "\n\nReference material:\n" + "\n".join(f"- {r}" for r in refs)


def shared_prefix_workload(n: int, seed: int = 0, tenants: int = 4) -> list[Messages]:
    """Requests from `tenants` tenants, each with its own long (~900 token) system prompt and short questions."""
    rng = _rng("shared-prefix", seed)
    pool = list(range(max(1, min(tenants, len(_TENANTS)))))
    systems = [tenant_system_prompt(i) for i in pool]
    out: list[Messages] = []
    order: list[int] = []
    while len(out) < n:
        if not order:  # each block visits every tenant once, in shuffled order, so all tenants recur
            order = list(pool)
            rng.shuffle(order)
        i = order.pop()
        tenant = _TENANTS[i]
        who = f"{rng.choice(_FIRST_NAMES)}, {tenant['ident'].format(rng.randrange(10000, 100000))}"
        question = rng.choice(tenant["questions"])
        out.append([
            {"role": "system", "content": systems[i]},
            {"role": "user", "content": f"Hi, this is {who}. {question}"},
        ])
    return out


def _add_typos(text: str, rng: random.Random, rate: float = 0.12) -> str:
    words = text.split(" ")
    for i, w in enumerate(words):
        core = w.rstrip(".,;:'")
        if len(core) < 4 or not core.isalpha() or rng.random() >= rate:
            continue
        j = rng.randrange(1, len(core) - 2)
        op = rng.randrange(3)
        if op == 0:  # swap two neighbouring letters
            core2 = core[:j] + core[j + 1] + core[j] + core[j + 2:]
        elif op == 1:  # drop a letter
            core2 = core[:j] + core[j + 1:]
        else:  # double a letter
            core2 = core[:j] + core[j] + core[j:]
        words[i] = core2 + w[len(core):]
    return " ".join(words)


def copy_workload(n: int, seed: int = 0) -> list[Messages]:
    """Prompts whose answer copies a ~100-200 token passage from the prompt (good for speculative decoding)."""
    rng = _rng("copy", seed)
    out: list[Messages] = []
    for _ in range(n):
        sentences = rng.choice(_PASSAGES)
        k = rng.randrange(len(sentences))  # rotate so repeats of a passage are rarely identical prompts
        text = " ".join(sentences[k:] + sentences[:k])
        template, typos = rng.choice(_COPY_INSTRUCTIONS)
        out.append([{"role": "user", "content": template.format(_add_typos(text, rng) if typos else text)}])
    return out


WORKLOADS: dict[str, Callable[[int, int], list[Messages]]] = {
    "chat": chat_workload,
    "shared-prefix": shared_prefix_workload,
    "copy": copy_workload,
}


_FOLLOW_UPS = [
    "Can you explain that in more detail?",
    "Give me a concrete example, please.",
    "What are the most common mistakes people make here?",
    "Summarize your last answer in two sentences.",
    "How would you explain this to someone who is new to it?",
    "What should I do first?",
    "Are there exceptions to what you just said?",
    "Why does that matter?",
    "Is there anything I should double-check before going ahead?",
    "Thanks. And what happens if that does not work?",
]


@dataclass
class Conversation:
    system: str
    user_turns: list[str]  # each turn's user message; the assistant's replies are fed back as they come


def multiturn_workload(n: int, turns: int = 6, seed: int = 0) -> list[Conversation]:
    """`n` conversations of `turns` turns: a tenant's long system prompt, a support question, then short
    follow-ups. Each turn's prompt extends the previous turn's prompt and reply."""
    rng = _rng("multiturn", seed)
    out = []
    for i in range(n):
        tenant = _TENANTS[i % len(_TENANTS)]
        who = f"{rng.choice(_FIRST_NAMES)}, {tenant['ident'].format(rng.randrange(10000, 100000))}"
        follow = list(_FOLLOW_UPS)
        rng.shuffle(follow)
        first = f"Hi, this is {who}. {rng.choice(tenant['questions'])}"
        out.append(Conversation(tenant["system"], [first] + _take(follow, turns - 1)))
    return out


def ideal_prefix_hit_rate(prompts: list[list[int]], block_size: int) -> float | None:
    """The prefix hit rate of one cache that never evicts, seeing `prompts` (token ids) in order: the ceiling
    for any routing over any number of replicas. Full blocks only, never a prompt's last token (as the engine)."""
    from specserve.routing.block_hash import block_hashes

    seen: set[bytes] = set()
    hit = total = 0
    for ids in prompts:
        hashes = block_hashes(ids[:(len(ids) - 1) // block_size * block_size], block_size)
        n = 0
        while n < len(hashes) and hashes[n] in seen:
            n += 1
        seen.update(hashes)
        hit += n * block_size
        total += len(ids)
    return hit / total if total else None


def build_workload(name: str, n: int, seed: int = 0) -> list[Messages]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    return WORKLOADS[name](n, seed)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


@dataclass
class RequestResult:
    index: int = 0
    ok: bool = False
    error: str | None = None  # "HTTP 503", an exception class name, "Timeout", ...
    detail: str | None = None
    status: int | None = None
    start_s: float = 0.0  # offset from the start of the pass
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    content_chunks: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    done: bool = False  # saw `data: [DONE]`
    finish_reason: str | None = None
    # Speculative decoding (specserve's usage.speculation): verification rounds with a draft, drafted and
    # accepted draft tokens.
    spec_rounds: int | None = None
    draft_tokens: int | None = None
    accepted_tokens: int | None = None
    # Prompt tokens served from a KV cache (usage.prompt_tokens_details.cached_tokens), and of those, the ones
    # imported from specserve's cluster KV store (usage.kv_store.imported_tokens).
    cached_tokens: int | None = None
    imported_tokens: int | None = None
    # specserve's prefix-aware router: the cached tokens it predicted for this request (usage.routing)
    predicted_cached_tokens: int | None = None
    text: str = ""  # the generated text (multi-turn workloads feed it back)
    _last_chunk_s: float = field(default=0.0, repr=False)

    def add_text(self, text: str, t0: float) -> None:
        """A streamed chunk's text arrived now: TTFT for the first, a gap for the others (t0: request start)."""
        now = time.perf_counter()
        if self.content_chunks == 0:
            self.ttft_s = now - t0
        else:
            self.itl_s.append(now - self._last_chunk_s)
        self._last_chunk_s = now
        self.text += text
        self.content_chunks += 1

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def summarize(results: list[RequestResult], wall_s: float, concurrency: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [g for r in ok for g in r.itl_s]
    e2es = [r.e2e_s for r in ok if r.e2e_s is not None]
    tpots = [t for t in (r.tpot_s for r in ok) if t is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot_ms = _ms(_mean(tpots))
    spec = [r for r in ok if r.spec_rounds is not None]
    rounds = sum(r.spec_rounds for r in spec)
    drafted = sum(r.draft_tokens or 0 for r in spec)
    accepted = sum(r.accepted_tokens or 0 for r in spec)
    cache = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    predicted = [r for r in cache if r.predicted_cached_tokens is not None]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r.error or "?" for r in results if not r.ok)),
        "wall_s": wall_s,
        "ttft_ms_p50": _ms(percentile(ttfts, 50)),
        "ttft_ms_p90": _ms(percentile(ttfts, 90)),
        "itl_ms_p50": _ms(percentile(itls, 50)),
        "itl_ms_p90": _ms(percentile(itls, 90)),
        "e2e_ms_p50": _ms(percentile(e2es, 50)),
        "e2e_ms_p90": _ms(percentile(e2es, 90)),
        "tpot_ms_mean": tpot_ms,
        # Only meaningful when one stream has the server to itself.
        "single_stream_tok_s": (1000.0 / tpot_ms) if concurrency == 1 and tpot_ms else None,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall_s if wall_s > 0 else None,
        "req_s": len(ok) / wall_s if wall_s > 0 else None,
        "usage_reported": bool(ok) and all(r.usage_reported for r in ok),
        "spec_rounds": rounds if spec else None,
        "draft_tokens": drafted if spec else None,
        "accepted_tokens": accepted if spec else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        # Tokens committed per speculative round (accepted drafts + the target's token).
        "mean_accepted_length": (accepted + rounds) / rounds if rounds else None,
        # Prompt tokens served from a KV cache (the replica's own, or imported from the store) / prompt tokens.
        "prefix_hit_rate": (sum(r.cached_tokens for r in cache) / sum(r.prompt_tokens for r in cache)) if cache
        else None,
        "imported_tokens": sum(r.imported_tokens or 0 for r in cache) if cache else None,
        # The router's prediction against what the verifier found: mean |predicted - actual| cached tokens.
        "prediction_mae_tokens": _mean([abs(r.predicted_cached_tokens - r.cached_tokens) for r in predicted])
        if predicted else None,
    }


# ---------------------------------------------------------------------------------------------------------
# HTTP client side
# ---------------------------------------------------------------------------------------------------------


class BenchError(Exception):
    """A problem that stops the run before any measurement (bad target, no model)."""


@dataclass
class Target:
    label: str
    url: str  # base URL without a trailing /v1
    model: str | None = None
    # --serve targets: config overrides (dotted keys) of a server the bench starts for this target's passes.
    serve: dict[str, str] | None = None


# --spec-matrix: one server per row, in this order; the first is the baseline of the ratios.
SPEC_MATRIX: dict[str, dict[str, str]] = {
    "no-spec": {"speculative.method": "none"},
    "ngram-k2": {"speculative.method": "ngram", "speculative.adaptive": "false", "speculative.num_speculative_tokens": "2"},
    "ngram-k4": {"speculative.method": "ngram", "speculative.adaptive": "false", "speculative.num_speculative_tokens": "4"},
    "layer_skip-k3": {"speculative.method": "layer_skip", "speculative.adaptive": "false",
                      "speculative.num_speculative_tokens": "3"},
    "int8-k3": {"speculative.method": "int8", "speculative.adaptive": "false", "speculative.num_speculative_tokens": "3"},
    "ngram-adaptive": {"speculative.method": "ngram", "speculative.adaptive": "true"},
    "int8-adaptive": {"speculative.method": "int8", "speculative.adaptive": "true"},
}


def _parse_overrides(text: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"bad {what} item {item!r}: expected KEY=VALUE with a dotted config key")
        out[key.strip()] = value.strip()
    return out


class ServedTarget:
    """A specserve server the bench starts for one target (on the Ray instance the bench started), then stops."""

    def __init__(self, target: Target, base: dict[str, str]):
        from specserve.cluster.config import SpecserveConfig

        overrides = {"server.app_name": "bench", **base, **(target.serve or {})}
        try:
            self.config = SpecserveConfig.load(overrides=_typed(overrides))
        except Exception as exc:  # noqa: BLE001 - pydantic's message names the field
            raise BenchError(f"target {target.label}: invalid server config: {exc}") from exc
        self.server = None

    def start(self) -> str:
        from specserve.cluster.launcher import LocalServer

        self.server = LocalServer(self.config).start(progress=True)
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _typed(overrides: dict[str, str]) -> dict[str, Any]:
    """YAML scalars: "false" -> False, "4" -> 4, lists stay strings unless written as YAML."""
    import yaml

    return {k: yaml.safe_load(v) if v != "" else None for k, v in overrides.items()}


@dataclass
class RequestSettings:
    endpoint: str  # "chat" or "completions"
    max_tokens: int
    temperature: float
    timeout: float


def _request_body(model: str, messages: Messages, s: RequestSettings) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if s.endpoint == "completions":
        # No chat template on this route: a plain concatenation keeps the shared prefix intact.
        body["prompt"] = "\n\n".join(m["content"] for m in messages)
        return "/v1/completions", body
    body["messages"] = messages
    return "/v1/chat/completions", body


def _chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    choices = chunk.get("choices") or []
    if not choices:
        return "", None
    c0 = choices[0] or {}
    delta = c0.get("delta")
    text = (delta or {}).get("content") if isinstance(delta, dict) else None
    if text is None:
        text = c0.get("text")
    return text or "", c0.get("finish_reason")


async def _stream_request(client: httpx.AsyncClient, path: str, body: dict[str, Any], res: RequestResult,
                          t0: float) -> None:
    async with client.stream("POST", path, json=body) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}"
            res.detail = (await resp.aread()).decode("utf-8", "replace")[:300]
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == "[DONE]":
                res.done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                res.error, res.detail = "BadSSE", data[:300]
                return
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                res.error, res.detail = "StreamError", json.dumps(chunk["error"])[:300]
                return
            usage = chunk.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                res.usage_reported = True
                res.output_tokens = int(usage["completion_tokens"])
                res.prompt_tokens = usage.get("prompt_tokens")
                details = usage.get("prompt_tokens_details")
                if isinstance(details, dict):
                    res.cached_tokens = details.get("cached_tokens")
                store = usage.get("kv_store")
                if isinstance(store, dict):
                    res.imported_tokens = store.get("imported_tokens")
                routing = usage.get("routing")
                if isinstance(routing, dict):
                    res.predicted_cached_tokens = routing.get("predicted_cached_tokens")
                spec = usage.get("speculation")
                if isinstance(spec, dict):
                    res.spec_rounds = spec.get("rounds")
                    res.draft_tokens = spec.get("draft_tokens")
                    res.accepted_tokens = spec.get("accepted_tokens")
            text, finish = _chunk_text(chunk)
            if finish:
                res.finish_reason = finish
            if text:
                res.add_text(text, t0)


async def run_request(client: httpx.AsyncClient, model: str, messages: Messages, s: RequestSettings,
                      pass_t0: float | None = None) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    res.start_s = t0 - (pass_t0 if pass_t0 is not None else t0)
    if isinstance(client, GrpcBenchClient):
        work = client.stream(model, messages, s, res, t0)
    else:
        path, body = _request_body(model, messages, s)
        work = _stream_request(client, path, body, res, t0)
    try:
        # httpx's timeout is per read; this bounds the whole request.
        await asyncio.wait_for(work, timeout=s.timeout)
    except asyncio.TimeoutError:
        res.error = "Timeout"
    except httpx.HTTPError as exc:
        res.error, res.detail = type(exc).__name__, str(exc)[:300]
    except (OSError, ValueError) as exc:
        res.error, res.detail = type(exc).__name__, str(exc)[:300]
    res.e2e_s = time.perf_counter() - t0
    if res.error is None and not res.done and res.content_chunks == 0:
        res.error = "EmptyStream"
    res.ok = res.error is None
    if not res.usage_reported:
        res.output_tokens = res.content_chunks  # servers without usage: one chunk ~ one token
    return res


async def run_pass(client: httpx.AsyncClient, model: str, prompts: list[Messages], concurrency: int,
                   s: RequestSettings) -> tuple[list[RequestResult], float, int]:
    """Run `prompts` with exactly `concurrency` workers; returns (results, wall seconds, max in flight)."""
    queue: asyncio.Queue[tuple[int, Messages]] = asyncio.Queue()
    for item in enumerate(prompts):
        queue.put_nowait(item)
    results: list[RequestResult | None] = [None] * len(prompts)
    in_flight = max_in_flight = 0
    t0 = time.perf_counter()

    async def worker() -> None:
        nonlocal in_flight, max_in_flight
        while True:
            try:
                i, messages = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                r = await run_request(client, model, messages, s, pass_t0=t0)
            finally:
                in_flight -= 1
            r.index = i
            results[i] = r

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(prompts))))))
    wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall, max_in_flight


async def resolve_model(client: httpx.AsyncClient, target: Target, model: str | None) -> str:
    """Check the target answers and pick its model: --model, else the first id of GET /v1/models."""
    if isinstance(client, GrpcBenchClient):
        try:
            ids = await client.models()
        except Exception as exc:  # noqa: BLE001 - grpc errors: unreachable, auth, ...
            raise BenchError(f"target {target.label} ({target.url}) unreachable: {exc}") from exc
        if not (model or ids):
            raise BenchError(f"target {target.label}: ListModels lists no models; pass --model")
        return model or ids[0]
    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise BenchError(f"target {target.label} ({target.url}) unreachable: {type(exc).__name__}: {exc}") from exc
    if model:
        return model  # reachable is enough; some servers have no /v1/models
    if resp.status_code != 200:
        raise BenchError(f"target {target.label}: GET /v1/models returned HTTP {resp.status_code}; pass --model")
    try:
        ids = [m["id"] for m in resp.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BenchError(f"target {target.label}: unexpected /v1/models response; pass --model") from exc
    if not ids:
        raise BenchError(f"target {target.label}: /v1/models lists no models; pass --model")
    return ids[0]


# ---------------------------------------------------------------------------------------------------------
# Run orchestration, output
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    targets: list[Target]
    model: str | None
    workloads: list[str]
    concurrency: list[int]
    num_requests: int | None
    max_tokens: int
    temperature: float
    seed: int
    warmup: int
    timeout: float
    endpoint: str
    api_key: str | None
    json_path: str | None
    serve_base: dict[str, str] = field(default_factory=dict)
    tokenizer: str | None = None  # model to tokenize the workloads with (for the ideal prefix hit rate)

    def requests_for(self, concurrency: int) -> int:
        return self.num_requests if self.num_requests else max(8, 4 * concurrency)

    def settings(self) -> RequestSettings:
        return RequestSettings(self.endpoint, self.max_tokens, self.temperature, self.timeout)


def _plan_prompts(cfg: BenchConfig) -> dict[tuple[str, int], list[Messages]]:
    # Each pass gets its own slice of one seeded stream, so later passes don't replay prompts the server just
    # cached; every target gets the same slices, so targets are compared on identical prompts.
    plan: dict[tuple[str, int], list[Messages]] = {}
    for w in cfg.workloads:
        total = sum(cfg.requests_for(c) for c in cfg.concurrency)
        prompts = build_workload(w, total, cfg.seed)
        pos = 0
        for c in cfg.concurrency:
            n = cfg.requests_for(c)
            plan[(w, c)] = prompts[pos:pos + n]
            pos += n
    return plan


def _ideal_hit_rates(cfg: BenchConfig, plan, served: "ServedTarget | None") -> dict[tuple[str, int], float | None]:
    """Per pass, the ideal prefix hit rate of its prompts, tokenized with their chat template by --tokenizer's
    model, else by the served model (with its block size)."""
    if cfg.endpoint != "chat" or not (cfg.tokenizer or served):
        return {}
    from transformers import AutoTokenizer

    from specserve.actors.model_loader import resolve_model_path
    from specserve.cluster.config import ModelConfig

    model = served.config.model if served and not cfg.tokenizer else ModelConfig(source=cfg.tokenizer)
    block_size = served.config.engine.block_size if served else 16
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(model.source, model.cache_dir))
    except Exception as exc:  # noqa: BLE001 - only a reference figure: report and go on without it
        _log(f"no ideal prefix hit rates: cannot load the tokenizer of {model.source!r}: {exc}")
        return {}
    out = {}
    for key, prompts in plan.items():
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
        out[key] = ideal_prefix_hit_rate([tok(t, add_special_tokens=False).input_ids for t in texts], block_size)
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _make_client(target: Target, cfg: BenchConfig) -> "httpx.AsyncClient | GrpcBenchClient":
    if target.url.startswith("grpc://"):
        return GrpcBenchClient(target.url, cfg.api_key)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    n = max(cfg.concurrency) + 2
    return httpx.AsyncClient(
        base_url=target.url,
        headers=headers,
        timeout=httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0)),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        trust_env=False,  # a proxy from the environment would distort every latency measured
    )


async def run_bench(cfg: BenchConfig, passes: list[dict[str, Any]]) -> None:
    """Run every pass, appending finished ones to `passes` (so an interrupted run keeps what it measured)."""
    settings = cfg.settings()
    clients = {t.label: _make_client(t, cfg) for t in cfg.targets if t.serve is None}
    served = {t.label: ServedTarget(t, cfg.serve_base) for t in cfg.targets if t.serve is not None}
    try:
        for t in cfg.targets:  # check every running target (and every --serve config) before measuring anything
            if t.serve is None:
                t.model = await resolve_model(clients[t.label], t, t.model or cfg.model)
        plan = _plan_prompts(cfg)
        ideal = None  # once a served model is pulled (or from --tokenizer)
        warm_prompts = _chat(cfg.warmup, _rng("warmup", cfg.seed))  # distinct from the measured prompts
        total = len(cfg.targets) * len(plan)
        for t in cfg.targets:
            if t.label in served:
                _log(f"{t.label}: starting a server with {t.serve}")
                t.url = await asyncio.to_thread(served[t.label].start)
                clients[t.label] = _make_client(t, cfg)
                t.model = await resolve_model(clients[t.label], t, t.model or cfg.model)
            if ideal is None:
                ideal = await asyncio.to_thread(_ideal_hit_rates, cfg, plan, served.get(t.label))
            try:
                await _run_target(t, clients[t.label], cfg, plan, warm_prompts, settings, passes, total, ideal)
            finally:
                if t.label in served:
                    await clients.pop(t.label).aclose()
                    await asyncio.to_thread(served[t.label].stop)
    finally:
        for c in clients.values():
            await c.aclose()


async def _run_target(t: Target, client: httpx.AsyncClient, cfg: BenchConfig, plan, warm_prompts, settings,
                      passes: list[dict[str, Any]], total: int, ideal: dict | None = None) -> None:
    k = len(passes)
    if warm_prompts:
        warm = [await run_request(client, t.model, m, settings) for m in warm_prompts]
        bad = [r for r in warm if not r.ok]
        note = f", {len(bad)} failed ({bad[0].error}: {bad[0].detail})" if bad else ""
        _log(f"{t.label}: model {t.model}, warmed up with {len(warm)} requests{note}")
    for w in cfg.workloads:
        for c in cfg.concurrency:
            results, wall, max_in_flight = await run_pass(client, t.model, plan[(w, c)], c, settings)
            summary = summarize(results, wall, c)
            summary["max_in_flight"] = max_in_flight
            summary["router"] = await router_summary(client)
            summary["ideal_prefix_hit_rate"] = (ideal or {}).get((w, c))
            passes.append({
                "target": t.label, "url": t.url, "model": t.model, "workload": w, "concurrency": c,
                "summary": summary, "requests": [_raw(r) for r in results],
            })
            k += 1
            mal = summary["mean_accepted_length"]
            _log(f"[{k}/{total}] {t.label} {w} c={c}: {summary['ok']}/{summary['requests']} ok, "
                 f"{_fmt(summary['output_tok_s'], 1)} out tok/s, "
                 f"TTFT p50 {_fmt(summary['ttft_ms_p50'], 0)} ms"
                 + (f", mean accepted length {mal:.2f}" if mal else "") + f" ({wall:.1f} s)")


async def router_summary(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """specserve's routing figures so far (GET /router/stats), or None for servers without them."""
    if isinstance(client, GrpcBenchClient):
        return None
    try:
        r = await client.get("/router/stats")
        stats = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(stats, dict) or not stats.get("routers"):
        return None
    routers = stats["routers"]
    lat = [x["decision_latency"] for x in routers]
    p99 = max((x["p99_s"] for x in lat if x.get("p99_s") is not None), default=None)
    p50 = max((x["p50_s"] for x in lat if x.get("p50_s") is not None), default=None)
    return {"policy": stats.get("policy"), "decisions": sum(x["count"] for x in lat),
            "decision_us_p50": p50 * 1e6 if p50 is not None else None,
            "decision_us_p99": p99 * 1e6 if p99 is not None else None,
            "index_blocks": sum(x["index_blocks"] for x in routers),
            "store_trust": min((x.get("store_trust", 1.0) for x in routers), default=None),
            "hash_us_p50": (stats["hash_latency"]["p50_s"] or 0) * 1e6}


def _raw(r: RequestResult) -> dict[str, Any]:
    d = asdict(r)
    d.pop("_last_chunk_s")
    d["tpot_s"] = r.tpot_s
    return d


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(passes: list[dict[str, Any]], cfg: BenchConfig) -> str:
    labels = [t.label for t in cfg.targets]
    multi = len(labels) > 1
    # Rows of the same workload & concurrency sit together, targets in the order given, for easy comparison.
    rows = sorted(passes, key=lambda p: (cfg.workloads.index(p["workload"]), cfg.concurrency.index(p["concurrency"]),
                                         labels.index(p["target"])))
    base = {(p["workload"], p["concurrency"]): p["summary"]["output_tok_s"] for p in passes if p["target"] == labels[0]}
    show_single = 1 in cfg.concurrency
    headers = ["workload", "conc", "target", "ok", "err", "TTFT p50", "TTFT p90", "ITL p50", "ITL p90", "TPOT"]
    headers += ["1-stream tok/s"] if show_single else []
    headers += ["out tok/s", "req/s"]
    show_spec = any(p["summary"].get("spec_rounds") for p in passes)
    headers += ["acc len", "accept"] if show_spec else []
    show_hits = any(p["summary"].get("prefix_hit_rate") for p in passes)
    headers += ["prefix hit"] if show_hits else []
    show_route = any(p["summary"].get("router") for p in passes)
    headers += ["route p99 us"] if show_route else []
    headers += [f"vs {labels[0]}"] if multi else []
    table = [headers]
    for p in rows:
        s = p["summary"]
        row = [p["workload"], str(p["concurrency"]), p["target"], str(s["ok"]), str(s["errors"]),
               _fmt(s["ttft_ms_p50"], 1), _fmt(s["ttft_ms_p90"], 1), _fmt(s["itl_ms_p50"], 1),
               _fmt(s["itl_ms_p90"], 1), _fmt(s["tpot_ms_mean"], 1)]
        if show_single:
            row.append(_fmt(s["single_stream_tok_s"], 1))
        row += [_fmt(s["output_tok_s"], 1), _fmt(s["req_s"], 2)]
        if show_spec:
            rate = s.get("acceptance_rate")
            row += [_fmt(s.get("mean_accepted_length"), 2), "-" if rate is None else f"{100 * rate:.0f}%"]
        if show_hits:
            hit = s.get("prefix_hit_rate")
            row.append("-" if hit is None else f"{100 * hit:.0f}%")
        if show_route:
            row.append(_fmt((s.get("router") or {}).get("decision_us_p99"), 0))
        if multi:
            b = base.get((p["workload"], p["concurrency"]))
            row.append(f"{s['output_tok_s'] / b:.2f}x" if b and s["output_tok_s"] is not None else "-")
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    text_cols = {0, 2}
    lines = []
    for j, r in enumerate(table):
        cells = [r[i].ljust(widths[i]) if i in text_cols else r[i].rjust(widths[i]) for i in range(len(r))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(latencies in ms; TTFT = time to first token, ITL = gap between streamed chunks, "
                 "TPOT = (e2e - TTFT) / (tokens - 1))")
    if show_spec:
        lines.append("(acc len = tokens committed per speculative round; accept = accepted / drafted tokens)")
    if show_hits:
        lines.append("(prefix hit = prompt tokens served from a KV cache, local or imported, / prompt tokens)")
        seen = set()
        for p in rows:
            ideal = p["summary"].get("ideal_prefix_hit_rate")
            if ideal is not None and (p["workload"], p["concurrency"]) not in seen:
                seen.add((p["workload"], p["concurrency"]))
                lines.append(f"(ideal prefix hit for {p['workload']} c={p['concurrency']}: {100 * ideal:.1f}%, "
                             "one cache that never evicts)")
    if show_route:
        lines.append("(route p99 us = prefix_cost routing decision time in the ingress, 99th percentile so far)")
    for p in rows:
        s = p["summary"]
        if s["errors"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(s["error_kinds"].items()))
            detail = next((r["detail"] for r in p["requests"] if not r["ok"] and r["detail"]), None)
            lines.append(f"errors in {p['target']} {p['workload']} c={p['concurrency']}: {kinds}"
                         + (f" (first: {detail[:120]})" if detail else ""))
        if s["ok"] and not s["usage_reported"]:
            lines.append(f"note: {p['target']} {p['workload']} c={p['concurrency']}: no usage in stream, "
                         "output tokens counted as content chunks")
    return "\n".join(lines)


def _parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise BenchError(f"empty {what} list")
    return items


def _normalize_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme == "grpc" and parsed.netloc:
        return url.rstrip("/")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BenchError(f"bad URL {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url  # accept both base and .../v1 forms


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specserve bench",
        description="Drive OpenAI-compatible servers with seeded workloads and report latency/throughput.",
        epilog="example: specserve bench --target specserve=http://127.0.0.1:8000 "
               "--target hf=http://127.0.0.1:8001 --workload chat,shared-prefix --concurrency 1,4,16 --json out.json",
    )
    p.add_argument("--url", action="append", default=[], help="server base URL (repeatable); default " + DEFAULT_URL)
    p.add_argument("--target", action="append", default=[], metavar="LABEL=URL[#MODEL]",
                   help="labelled server to compare (repeatable; #MODEL names its model; grpc://HOST:PORT drives "
                        "specserve's gRPC API); the first is the baseline for ratios")
    p.add_argument("--model", default=None, help="model name to request (default: first id of GET /v1/models)")
    p.add_argument("--workload", action="append", default=None, metavar="NAME[,NAME]",
                   help=f"workload(s): {', '.join(WORKLOADS)} (repeatable or comma list; default chat)")
    p.add_argument("--concurrency", default="1,4,16", help="comma list; one pass per value (default 1,4,16)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per pass (default max(8, 4 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per target first (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="chat: /v1/chat/completions (default); completions: /v1/completions")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write all results here")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--serve", action="append", default=[], metavar="LABEL=KEY=VALUE[,KEY=VALUE...]",
                   help="start a specserve server with these config overrides (dotted keys, e.g. "
                        "speculative.method=ngram) for this target's passes, then stop it (repeatable)")
    p.add_argument("--serve-base", default="", metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="overrides applied to every --serve server (e.g. model.dtype=bfloat16)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="model (registry name or path) whose chat template and tokenizer give each pass's ideal "
                        "prefix hit rate (default: the --serve model)")
    p.add_argument("--spec-matrix", action="store_true",
                   help="--serve one server per speculation setting: " + ", ".join(SPEC_MATRIX))
    return p


def parse_config(argv: list[str]) -> BenchConfig:
    """Parse and validate; raises BenchError on bad values (argparse itself exits on unknown flags)."""
    a = build_parser().parse_args(argv)
    targets: list[Target] = []
    for spec in a.target:
        label, sep, url = spec.partition("=")
        url, _, model = url.partition("#")  # LABEL=URL#MODEL: a model name for this target only
        if not sep or not label.strip() or not url.strip():
            raise BenchError(f"bad --target {spec!r}: expected LABEL=URL or LABEL=URL#MODEL")
        targets.append(Target(label.strip(), _normalize_url(url.strip()), model=model.strip() or None))
    served: list[tuple[str, dict[str, str]]] = list(SPEC_MATRIX.items()) if a.spec_matrix else []
    for spec in a.serve:
        label, sep, rest = spec.partition("=")
        if not sep or not label.strip():
            raise BenchError(f"bad --serve {spec!r}: expected LABEL=KEY=VALUE[,KEY=VALUE...]")
        served.append((label.strip(), _parse_overrides(rest, "--serve")))
    port = int(_parse_overrides(a.serve_base, "--serve-base").get("server.http_port", 8000))
    for label, overrides in served:
        targets.append(Target(label, f"http://127.0.0.1:{overrides.get('server.http_port', port)}", serve=overrides))
    for url in a.url:
        norm = _normalize_url(url)
        targets.append(Target(urlparse(norm).netloc, norm))
    if not targets:
        targets.append(Target(urlparse(DEFAULT_URL).netloc, DEFAULT_URL))
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise BenchError(f"duplicate target labels {labels}; use --target LABEL=URL to name them")
    workloads: list[str] = []
    for spec in a.workload or ["chat"]:
        for w in _parse_list(spec, "--workload"):
            if w not in WORKLOADS:
                raise BenchError(f"unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
            if w not in workloads:
                workloads.append(w)
    concurrency: list[int] = []
    for c in _parse_list(a.concurrency, "--concurrency"):
        if not c.isdigit() or int(c) < 1:
            raise BenchError(f"bad --concurrency value {c!r}: expected positive integers like 1,4,16")
        if int(c) not in concurrency:
            concurrency.append(int(c))
    for name, value, low in (("--num-requests", a.num_requests, 1), ("--max-tokens", a.max_tokens, 1),
                             ("--warmup", a.warmup, 0)):
        if value is not None and value < low:
            raise BenchError(f"{name} must be >= {low}")
    if a.timeout <= 0:
        raise BenchError("--timeout must be > 0")
    if a.temperature < 0:
        raise BenchError("--temperature must be >= 0")
    return BenchConfig(targets=targets, model=a.model, workloads=workloads, concurrency=concurrency,
                       num_requests=a.num_requests, max_tokens=a.max_tokens, temperature=a.temperature,
                       seed=a.seed, warmup=a.warmup, timeout=a.timeout, endpoint=a.endpoint, api_key=a.api_key,
                       json_path=a.json_path, serve_base=_parse_overrides(a.serve_base, "--serve-base"),
                       tokenizer=a.tokenizer)


def _config_json(cfg: BenchConfig, argv: list[str]) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("api_key")  # never write secrets to the results file
    d["argv"] = ["***" if prev == "--api-key" else "--api-key=***" if x.startswith("--api-key=") else x
                 for prev, x in zip([""] + argv, argv)]
    d["requests_per_pass"] = {str(c): cfg.requests_for(c) for c in cfg.concurrency}
    return d


def write_json(path: str, cfg: BenchConfig, argv: list[str], passes: list[dict[str, Any]], started: float,
               complete: bool) -> None:
    doc = {
        "tool": "specserve bench",
        "version": 1,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "complete": complete,
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "config": _config_json(cfg, argv),
        "passes": passes,
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def _start_ray_for_served(cfg: BenchConfig) -> bool:
    """One local Ray instance for all --serve servers (they start and stop apps on it, not Ray itself)."""
    if not any(t.serve is not None for t in cfg.targets):
        return False
    import logging
    import os

    import ray

    if ray.is_initialized():
        return False
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passes: list[dict[str, Any]] = []
    started = time.time()
    code = 0
    ray_started = _start_ray_for_served(cfg)
    try:
        asyncio.run(run_bench(cfg, passes))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _log("interrupted; reporting the passes that finished")
        code = 130
    finally:
        if ray_started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    if passes:
        print(format_table(passes, cfg))
    if cfg.json_path:
        write_json(cfg.json_path, cfg, argv, passes, started, complete=code == 0)
        _log(f"wrote {cfg.json_path}")
    return code
