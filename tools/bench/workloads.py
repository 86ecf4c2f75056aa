"""Seeded benchmark workloads. Every workload is a list of `Session`s: a first message list and the user's
follow-up turns (none for single-turn workloads); a multi-turn session feeds each reply back into the next
prompt, so each turn's prompt extends the last. Pure functions of (n, seed): each kind seeds its own RNG from a
string, so different kinds (and the warm-up prompts) never coincide for the same seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

Messages = list[dict[str, str]]

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

_LONG_QUESTIONS = [
    "Summarize each of the documents above in one sentence.",
    "Which of the documents above mentions a number, and what is it?",
    "List the people or groups the documents above talk about.",
    "Which document above would be most useful to a new employee, and why?",
    "Write a title for each of the documents above.",
]


@dataclass
class Session:
    """One client's work: `messages` is the first request; each of `follow_ups` is sent after the previous
    reply, as the next user turn of the same conversation."""

    messages: Messages
    follow_ups: list[str] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return 1 + len(self.follow_ups)


def _rng(kind: str, seed: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and Python versions.
    return random.Random(f"specserve-bench:{kind}:{seed}")


def _take(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)] if items else []


def chat_messages(n: int, rng: random.Random) -> list[Messages]:
    combos = [(s, q, x) for q in _CHAT_QUESTIONS for s in _CHAT_STYLES for x in _CHAT_SUFFIXES]
    rng.shuffle(combos)  # about 900 distinct prompts before any repeat
    return [[{"role": "user", "content": f"{s}{q}{x}"}] for s, q, x in _take(combos, n)]


def warmup_messages(n: int, seed: int) -> list[Messages]:
    """Short chat prompts from a stream of their own, so warm-up never caches a measured prompt."""
    return chat_messages(n, _rng("warmup", seed))


def chat_workload(n: int, seed: int = 0) -> list[Session]:
    """Short single-turn chat prompts (roughly 10-40 tokens)."""
    return [Session(m) for m in chat_messages(n, _rng("chat", seed))]


def tenant_system_prompt(i: int, reference_passages: int = 4) -> str:
    """Tenant i's system prompt: its instructions, then reference material (as a RAG-style assistant carries)."""
    refs = [" ".join(_PASSAGES[(2 * i + k) % len(_PASSAGES)]) for k in range(reference_passages)]
    return _TENANTS[i]["system"] + "\n\nReference material:\n" + "\n".join(f"- {r}" for r in refs)


def _customer(tenant: dict[str, Any], rng: random.Random) -> str:
    return f"{rng.choice(_FIRST_NAMES)}, {tenant['ident'].format(rng.randrange(10000, 100000))}"


def shared_prefix_workload(n: int, seed: int = 0, tenants: int = 4) -> list[Session]:
    """Multi-tenant: requests from `tenants` tenants, each with its own long (~900 token) system prompt shared
    by all its requests, and short questions."""
    rng = _rng("shared-prefix", seed)
    pool = list(range(max(1, min(tenants, len(_TENANTS)))))
    systems = [tenant_system_prompt(i) for i in pool]
    out: list[Session] = []
    order: list[int] = []
    while len(out) < n:
        if not order:  # each block visits every tenant once, in shuffled order, so all tenants recur
            order = list(pool)
            rng.shuffle(order)
        i = order.pop()
        tenant = _TENANTS[i]
        out.append(Session([
            {"role": "system", "content": systems[i]},
            {"role": "user", "content": f"Hi, this is {_customer(tenant, rng)}. {rng.choice(tenant['questions'])}"},
        ]))
    return out


def add_typos(text: str, rng: random.Random, rate: float = 0.12) -> str:
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


def copy_workload(n: int, seed: int = 0) -> list[Session]:
    """Input copying: prompts whose answer repeats a ~100-200 token passage of the prompt (summaries and edits
    that echo their input; where n-gram drafts shine)."""
    rng = _rng("copy", seed)
    out: list[Session] = []
    for _ in range(n):
        sentences = rng.choice(_PASSAGES)
        k = rng.randrange(len(sentences))  # rotate so repeats of a passage are rarely identical prompts
        text = " ".join(sentences[k:] + sentences[:k])
        template, typos = rng.choice(_COPY_INSTRUCTIONS)
        out.append(Session([{"role": "user", "content": template.format(add_typos(text, rng) if typos else text)}]))
    return out


def multiturn_workload(n: int, seed: int = 0, turns: int = 4) -> list[Session]:
    """ceil(n / turns) conversations of `turns` turns (n requests in all): a tenant's system prompt, a support
    question, then short follow-ups; each turn's prompt is the last one plus its reply plus the new question."""
    rng = _rng("multiturn", seed)
    out = []
    for i in range(math.ceil(n / turns)):
        tenant = _TENANTS[i % len(_TENANTS)]
        who = _customer(tenant, rng)
        follow = list(_FOLLOW_UPS)
        rng.shuffle(follow)
        first = f"Hi, this is {who}. {rng.choice(tenant['questions'])}"
        out.append(Session([{"role": "system", "content": tenant["system"]}, {"role": "user", "content": first}],
                           _take(follow, turns - 1)))
    return out


def long_workload(n: int, seed: int = 0, documents: int = 12) -> list[Session]:
    """Long prompts (~2,800 tokens for SmolLM2's tokenizer): `documents` passages and tenant policies in a
    seeded order under a header of their own, then a question. The header comes first, so past the chat
    template's own preamble no two prompts share a block."""
    rng = _rng("long", seed)
    pool = [" ".join(p) for p in _PASSAGES] + [t["system"] for t in _TENANTS]
    out = []
    for _ in range(n):
        docs = rng.sample(pool, min(documents, len(pool)))
        header = f"Case file {rng.randrange(10 ** 7, 10 ** 8)}, prepared for {rng.choice(_FIRST_NAMES)}."
        body = "\n\n".join(f"Document {j + 1}:\n{d}" for j, d in enumerate(docs))
        out.append(Session([{"role": "user", "content": f"{header}\n\n{body}\n\n{rng.choice(_LONG_QUESTIONS)}"}]))
    return out


_AGENT_SYSTEM = (
    "You are an operations agent for an online shop. You act only through tools. To call a tool, answer with one "
    "line of JSON: {\"tool\": NAME, \"arguments\": {...}}. When the task is done, answer with one line of JSON: "
    "{\"tool\": \"finish\", \"arguments\": {\"summary\": TEXT}}.\n"
    "Tools:\n"
    "- lookup_order(order_id: string): the order's status, items, carrier and tracking number.\n"
    "- lookup_customer(email: string): the customer's name, tier and open tickets.\n"
    "- issue_refund(order_id: string, amount: number, reason: string): refunds part or all of an order.\n"
    "- send_email(to: string, subject: string, body: string): emails a customer.\n"
    "- finish(summary: string): ends the task."
)
_AGENT_TASKS = [
    "Customer {email} says order {order} arrived damaged. Check the order, refund the damaged item and email them.",
    "Customer {email} asks where order {order} is. Look it up and email them the tracking number.",
    "Order {order} for {email} was charged twice. Verify the order and refund the duplicate charge, then tell them.",
]
_AGENT_STATUS = ["shipped", "delivered", "delayed at the depot", "out for delivery"]
_AGENT_ITEMS = ["desk lamp", "coffee grinder", "wool blanket", "bike light", "water bottle", "phone stand"]


def agentic_workload(n: int, seed: int = 0, turns: int = 4) -> list[Session]:
    """An agent loop: the same tool-use prompt again and again with small changes (order numbers, customers,
    items), each conversation a task followed by tool results as the next turns. Its replies repeat each other's
    structure across conversations: where a global suffix tree of earlier outputs pays."""
    rng = _rng("agentic", seed)
    out = []
    for _ in range(math.ceil(n / turns)):
        name = rng.choice(_FIRST_NAMES)
        email = f"{name.lower()}.{rng.randrange(100, 999)}@example.com"
        order = f"A-{rng.randrange(10 ** 5, 10 ** 6)}"
        item = rng.choice(_AGENT_ITEMS)
        price = rng.randrange(12, 90) + 0.99
        results = [
            f'Tool result: {{"order_id": "{order}", "status": "{rng.choice(_AGENT_STATUS)}", "items": '
            f'[{{"name": "{item}", "price": {price}}}], "carrier": "ParcelNet", "tracking": '
            f'"PN{rng.randrange(10 ** 8, 10 ** 9)}"}}',
            f'Tool result: {{"email": "{email}", "name": "{name}", "tier": "{rng.choice(["standard", "gold"])}", '
            f'"open_tickets": {rng.randrange(0, 3)}}}',
            'Tool result: {"ok": true}',
        ]
        task = rng.choice(_AGENT_TASKS).format(email=email, order=order)
        out.append(Session([{"role": "system", "content": _AGENT_SYSTEM}, {"role": "user", "content": task}],
                           _take(results, turns - 1)))
    return out


WORKLOADS: dict[str, Callable[[int, int], list[Session]]] = {
    "chat": chat_workload,
    "shared-prefix": shared_prefix_workload,
    "multiturn": multiturn_workload,
    "copy": copy_workload,
    "long": long_workload,
    "agentic": agentic_workload,
}


def build_workload(name: str, n: int, seed: int = 0) -> list[Session]:
    """At least `n` requests of workload `name` (a multi-turn session counts each of its turns)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    return WORKLOADS[name](n, seed)


def ideal_prefix_hit_rate(prompts: list[list[int]], block_size: int) -> float | None:
    """The prefix hit rate of one cache that starts empty and never evicts, seeing `prompts` (token ids) in
    order: computed, not measured; the ceiling for any routing over replicas whose caches start empty (a server
    still holding earlier prompts can exceed it). Full blocks only, never a prompt's last token (as the engine)."""
    from specserve.actors.engine.block_hash import block_hashes

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
