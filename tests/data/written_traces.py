"""Reasoning traces written for the tests, in the styles of R1-distill, QwQ and Qwen3 thinking.

Each math trace states where a correct controller should stop: after the first solution plus the
reflection that confirms it. NON_MATH holds thinking without answers (code, prose, planning).
"""

from __future__ import annotations

R1_SPEED = """Okay, so I need to find Alice's speed. She walks 18 miles in 3 hours. Speed is distance over time.

So 18 divided by 3 is 6. So her speed must be 6 mph.

Wait, let me double-check that. If she walks 6 miles per hour for 3 hours, she covers 6 times 3, which is 18 miles. That matches the distance in the problem.

So the answer is 6.

But wait, maybe the question wants the speed in another unit? No, it says miles per hour. Let me re-read the problem once more to be safe. It asks for her speed in mph, and I have 6 mph. Hmm, what if she took a break? The problem doesn't mention a break, so I'll assume constant speed. Alternatively, I could think of it as 1 mile every 10 minutes, which is 6 miles per hour. Yes, that's consistent.
"""
R1_SPEED_STOP_AFTER = "So the answer is 6."
R1_SPEED_ANSWER = "6"

QWEN3_REVISED = """Let me figure out how many apples are left. Tom starts with 12 apples and gives away 5, so 12 - 5 = 7.

So he has 7 apples left.

Wait, no, the problem says he gives away 5 apples to each of his 2 friends. That's 10 apples in total. So 12 - 10 = 2.

So he has 2 apples left.

Let me verify: 2 friends times 5 apples is 10 apples given away, and 12 - 10 = 2. Therefore, the answer is 2.

Hmm, but should I double check whether he also ate one? The problem doesn't say that, so no. Let me also think about whether "each" applies to both friends. Yes, it does. So 2 is right. I'm quite sure. Let me write it up nicely, and maybe also mention the intermediate step of 10 apples.
"""
QWEN3_REVISED_STOP_AFTER = "Therefore, the answer is 2."
QWEN3_REVISED_ANSWER = "2"

QWQ_BOXED = """Alright, I've got this problem: what is the sum of the first 10 positive integers? I know the formula n(n+1)/2.

Plugging in n = 10, that's 10 times 11 over 2, which is 110 over 2, so 55.

So, the sum is \\( 55 \\).

But let me check this another way. Alternatively, I can pair the numbers: 1 + 10, 2 + 9, 3 + 8, 4 + 7, 5 + 6. That's 5 pairs, each summing to 11, so 5 times 11 is 55.

So, the sum is indeed \\( \\boxed{55} \\).

Just to be thorough, let me add them one by one: 1, 3, 6, 10, 15, 21, 28, 36, 45, 55. Yes, that's 55 again. I think that's solid. Maybe I should also consider whether "positive integers" includes zero, but zero isn't positive, so it doesn't matter. And the formula is standard. Alright.
"""
QWQ_BOXED_STOP_AFTER = "So, the sum is indeed \\( \\boxed{55} \\)."
QWQ_BOXED_ANSWER = "55"

MATH_TRACES = [
    (R1_SPEED, R1_SPEED_STOP_AFTER, R1_SPEED_ANSWER),
    (QWEN3_REVISED, QWEN3_REVISED_STOP_AFTER, QWEN3_REVISED_ANSWER),
    (QWQ_BOXED, QWQ_BOXED_STOP_AFTER, QWQ_BOXED_ANSWER),
]

NON_MATH = [
    # code
    """The user wants a Python function that removes duplicates from a list while keeping order. I could use a set, but sets don't keep order. Wait, actually dict.fromkeys keeps insertion order since Python 3.7.

So the function is just `return list(dict.fromkeys(items))`. Let me double-check with an example: [3, 1, 3, 2, 1] gives [3, 1, 2]. That works.

Hmm, but what if the items are unhashable, like lists? Then dict.fromkeys raises a TypeError. Alternatively, I could fall back to a loop with a seen list, which is O(n^2). Let me think about whether that matters. The user didn't mention unhashable items, so I'll mention it as a caveat.

Wait, should I also handle None? None is hashable, so it's fine. Let me also write a docstring and a couple of tests. The first test checks an empty list, the second checks the example above. I think that's enough.
""",
    """I need to find why the loop never terminates. The loop is `while i < n:` and inside it we do `i += step`. If step is 0, the loop never ends.

So the bug is that step can be 0 when the input has length 1. Let me check: with length 1, step = len(items) // 2, which is 0. Yes.

Wait, let me double-check the integer division. 1 // 2 is 0 in Python 3. Right.

So the fix is to use max(1, len(items) // 2). Alternatively, we could return early for short inputs. Hmm, the early return is clearer. Let me verify that the early return doesn't break the empty list case: for an empty list the loop body never runs anyway. Good. I'll suggest the early return and add a test for a single-element list.
""",
    """The index of the first element is 0 in Python. So the index is 0 for the head of the list.

Wait, let me check how the slicing works here. items[0:2] gives the first two elements. So the slice has 2 elements.

Let me verify with the example from the traceback. The traceback says IndexError at line 14. So the problem is on line 14.

Hmm, line 14 reads items[len(items)]. That's off by one; the last valid index is len(items) - 1. So the index is 0 only for a one-element list. Let me double-check that claim: for a one-element list, len(items) - 1 = 0. Yes. I'll explain the off-by-one and show the corrected line.
""",
    # prose
    """The user asked for a short poem about autumn. I want it to have four lines with a gentle rhythm. Let me think about imagery: falling leaves, cooler air, early dusk.

Wait, maybe I should rhyme the second and fourth lines. Leaves and eaves could rhyme. Alternatively, gold and cold is a classic pair.

Let me draft: "The maples blush in fading gold, / the mornings turn a little cold, / the swallows leave, the fields grow still, / and smoke drifts softly down the hill." Hmm, that's an AABB scheme, not ABCB. That's fine though; the user didn't ask for a specific scheme.

Let me double-check the syllables. Each line has about eight syllables. Good enough for a light poem.
""",
    """I should summarize the article in three sentences. The article is about a city that replaced parking lots with parks. The main points are the cost, the public reaction, and the effect on local shops.

Wait, the article also mentions traffic. Let me re-read the third paragraph. It says traffic dropped by about 10 percent in the first year. So the summary should mention traffic too.

Hmm, three sentences might be tight. Alternatively, I could merge cost and reaction into one sentence. Let me verify that the article really says shops did better: yes, it quotes two shop owners whose sales went up. So the effect on shops was positive.

Let me write it now and keep each sentence under 25 words.
""",
    # planning
    """We need a three-day itinerary for Lisbon. Day 1 could be the old town: Alfama, the castle, and a fado show in the evening. Day 2 is Belem, with the tower and the monastery. Day 3 could be a trip to Sintra.

Wait, Sintra takes most of a day, so maybe it should be day 2 when they're fresh. Let me check the train: it takes about 40 minutes from Rossio. So Sintra is easy as a day trip.

Hmm, the user said they arrive at 3 pm on day 1. So day 1 is only half a day. Let me double-check the timing: 3 pm arrival, hotel check-in by 4 pm, then a walk in Alfama and dinner. That works.

Alternatively, we could put Belem on day 3 morning before the flight. Let me verify the flight time: they leave at 6 pm, so there's time for Belem in the morning. The plan is day 1 Alfama, day 2 Sintra, day 3 Belem.
""",
    """The team has 5 engineers and 3 projects. I need to assign people so each project has at least one engineer and the senior engineer leads the biggest project.

So the biggest project gets 2 engineers, including the senior one. Wait, the biggest project might need 3. Let me check the estimates: it's 40 person-weeks, and the others are 15 and 10.

Hmm, with 5 engineers over 8 weeks, that's 40 person-weeks in total for all projects, but we need 65. So the schedule doesn't fit. Let me double-check that sum: 40 + 15 + 10 = 65. Yes.

So we have to push one project or get more people. Alternatively, we can cut scope on the biggest project. Let me write down both options with their trade-offs for the manager.
""",
    # chit-chat
    """The user says hi and asks how my day is going. I should reply warmly and briefly. Wait, I don't have days in the usual sense, but I can still be friendly.

Let me keep it to one or two sentences and ask what they'd like help with. Hmm, maybe add a light touch of humor. Let me double-check the tone: friendly, not too long. Okay.
""",
]
