"""The small built-in English and chat corpus behind the tiny models.

It trains the byte-level BPE tokenizer and feeds the brief pre-training pass,
so the tiny model knows common English pieces, the chat layout and when to
end its turn before any user data arrives. It is fixed text (no randomness
here): every build sees the same corpus, and only the build seed decides the
order it is read in.

The content is deliberately plain: product support, everyday facts, small
sums, "repeat after me" turns (which teach copying from the prompt) and short
prose. It is not meant to make a useful model, only a trainable one.
"""

from __future__ import annotations

PROSE = (
    "The app saves your work every few seconds, so a crash does not lose much.",
    "Most people open the settings page once and never come back to it.",
    "A good answer is short, correct and polite.",
    "The battery lasts longer when the screen is dim and the radio is off.",
    "Our team reads every piece of feedback, even the angry ones.",
    "The new version starts faster and uses less memory than the old one.",
    "If the download stops, check your network and try again.",
    "Small models can run on a phone without sending data to a server.",
    "The weather was cold in the morning and warm by the afternoon.",
    "She made a pot of tea and sat down to read the report.",
    "The train leaves at nine and arrives a little after noon.",
    "He fixed the bug, wrote a test for it, and went home early.",
    "Water boils at one hundred degrees at sea level.",
    "The river runs through the old town and past the market.",
    "A cat sleeps for most of the day and hunts at night.",
    "Bread needs flour, water, salt and time.",
    "The library opens at ten on weekdays and at noon on Sunday.",
    "Please keep your password private and change it if you think it leaked.",
    "The export button is in the top right corner of the screen.",
    "You can undo the last change with the undo button.",
    "The meeting moved to Thursday because the room was booked.",
    "Every order comes with a receipt sent to your email.",
    "The search box finds notes by title and by content.",
    "A short walk after lunch helps many people focus.",
    "The garden needs water twice a week in summer.",
    "Dark mode is easier on the eyes at night.",
    "The update is free for everyone who bought the app.",
    "Support replies within one working day.",
    "The map works offline once you download the region.",
    "Syncing keeps your notes the same on every device.",
    "The children played in the park until it got dark.",
    "Fresh fruit is sold at the market every Saturday.",
    "The first draft was long, so she cut it in half.",
    "A clear error message tells you what went wrong and how to fix it.",
    "The price includes tax and free shipping.",
    "Your data stays on your device unless you turn on backup.",
    "The phone vibrates when a message arrives.",
    "He asked a simple question and got a simple answer.",
    "The sky was blue and there was not a single cloud.",
    "Thank you for the feedback, it helps us make the app better.",
    "We are sorry the app crashed, and we fixed it in the next release.",
    "The camera takes sharp photos even in low light.",
    "The store is closed on public holidays.",
    "Reading before bed helps some people sleep.",
    "The package arrived two days early and in good shape.",
    "Notifications can be turned off for each app.",
    "The model answers in one or two sentences.",
    "A backup is only useful if you can restore it.",
    "The shortcut to save is control and the letter s.",
    "The old bridge was closed for repairs all summer.",
)

# Hand-written support turns: the kind of exchange edgetune tunes for.
SUPPORT_CHATS = (
    ("How do I reset my password?", "Open settings, choose account, then tap reset password."),
    ("The app crashes when I open it.",
     "Sorry about that. Please update to the latest version and restart your phone."),
    ("Can I use the app offline?", "Yes. Your notes and maps work offline once they are downloaded."),
    ("How do I export my notes?", "Tap the export button in the top right corner and pick a format."),
    ("Is my data private?", "Yes. Your data stays on your device unless you turn on backup."),
    ("How do I turn on dark mode?", "Go to settings, then display, and switch on dark mode."),
    ("Why is the app so slow?", "Try closing other apps. The new version also starts faster."),
    ("How long does shipping take?", "Most orders arrive within three to five days."),
    ("Can I get a refund?", "Yes. You can ask for a refund within thirty days of your order."),
    ("Where is my receipt?", "Every receipt is sent to your email right after the order."),
    ("How do I delete my account?", "Open settings, choose account, and tap delete account."),
    ("Does the update cost money?", "No. The update is free for everyone who bought the app."),
    ("How do I sync my devices?", "Sign in on each device and turn on sync in settings."),
    ("The battery drains fast.", "Lower the screen brightness and turn off location when you do not need it."),
    ("How do I contact support?", "Write to us from the help page. We reply within one working day."),
    ("Can I change the language?", "Yes. Go to settings, then language, and pick one from the list."),
    ("How do I undo a change?", "Tap the undo button or press control and the letter z."),
    ("What does the star icon mean?", "The star marks a note as a favourite so you can find it fast."),
    ("How do I share a note?", "Open the note, tap share, and choose who to send it to."),
    ("Thanks, that worked!", "Great, I am glad it helped. Have a nice day!"),
    ("Hello", "Hello! How can I help you today?"),
    ("Who are you?", "I am a small assistant that runs on your device."),
    ("What can you do?", "I can answer short questions about the app and help with common problems."),
    ("Good morning", "Good morning! What can I do for you?"),
)

# Facts for templated turns; the templates (below) give many short variations.
CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Peru", "Lima"),
    ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Chile", "Santiago"),
)
ANIMAL_SOUNDS = (
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"),
    ("sheep", "baa"), ("owl", "hoot"), ("lion", "roar"), ("frog", "croak"),
)
COLOURS = (
    ("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"),
    ("a lemon", "yellow"), ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"),
)
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly support assistant. Answer briefly.",
)


def templated_chats() -> list[tuple[str, str]]:
    """Expand the fact tables into (question, answer) pairs, in a fixed order."""
    pairs: list[tuple[str, str]] = []
    for country, city in CAPITALS:
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for animal, sound in ANIMAL_SOUNDS:
        pairs.append((f"What sound does a {animal} make?", f"A {animal} says {sound}."))
    for thing, colour in COLOURS:
        pairs.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for a in range(0, 6):  # few sums: digits are costly to learn and say little about chat
        for b in range(0, 6):
            pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    for n in range(0, 20):
        pairs.append((f"What comes after {NUMBER_WORDS[n]}?", f"After {NUMBER_WORDS[n]} comes {NUMBER_WORDS[n + 1]}."))
    # Copying from the prompt is the skill a fine-tune leans on most.
    for sentence in PROSE:
        pairs.append((f"Repeat after me: {sentence}", sentence))
    return pairs


def conversations() -> list[list[dict[str, str]]]:
    """Every built-in chat as a list of messages, in a fixed order.

    Some carry a system prompt and some are two turns long, so the model sees
    the roles and turn boundaries it will meet in fine-tuning.
    """
    pairs = list(SUPPORT_CHATS) + templated_chats()
    convs: list[list[dict[str, str]]] = []
    for i, (question, answer) in enumerate(pairs):
        msgs: list[dict[str, str]] = []
        if i % 4 == 0:
            msgs.append({"role": "system", "content": SYSTEM_PROMPTS[(i // 4) % len(SYSTEM_PROMPTS)]})
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 5 == 0:
            q2, a2 = pairs[(i * 7 + 3) % len(pairs)]
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        convs.append(msgs)
    return convs


def tokenizer_texts() -> list[str]:
    """Plain texts for training the BPE merges (prose plus every chat message)."""
    texts = list(PROSE)
    for conv in conversations():
        texts.extend(m["content"] for m in conv)
    return texts
