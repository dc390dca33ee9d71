"""The judges' held-out labelled cases: ordinary English sentences written for this project, with known answers.

Twelve topics, each with a short name (a candidate label), an autointerp-style explanation, eight
on-topic sentences and one "mild" sentence that only touches the topic; neutral sentences; and
lexical minimal pairs (negation, numbers, tense...) where topical similarity does not help.

- detection: (explanation, context, label): 2 on-topic + 2 off-topic contexts per topic (48 cases),
  plus 32 lexical cases (:func:`lexical_detection_cases`)
- ranking: (contexts, candidate names, index of the right one): 5 contexts per topic (12 cases)
- steering: (concept, text_a, text_b, 1 if b is more about the concept): 3 pairs per topic (36)

Every run scores its judges on these (the judge-accuracy stage) so that a result reads together with
how well its judge tells known answers apart. None of these sentences comes from the corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOPICS = {
    "cooking": ("references to cooking, recipes and preparing food", [
        "Chop the onions finely and fry them in butter until they turn golden.",
        "She rolled out the dough and cut it into small squares for the dumplings.",
        "Stir the sauce slowly so it does not stick to the bottom of the pan.",
        "He seasoned the chicken with salt, pepper and a little lemon juice.",
        "Bake the bread for forty minutes, then let it cool on a rack.",
        "The soup needs more garlic and a handful of fresh basil.",
        "Whisk the eggs with the sugar until the mixture is pale and thick.",
        "Simmer the beans for an hour and drain them before adding the spices.",
    ], "On the way home she remembered that there was nothing for dinner."),
    "weather": ("descriptions of the weather: rain, wind, storms, temperature", [
        "Heavy rain is expected tonight, with strong winds along the coast.",
        "The morning was cold and foggy, but the sun came out by noon.",
        "A thunderstorm rolled in and hail began to hit the windows.",
        "Temperatures will drop below freezing, so watch for ice on the roads.",
        "It has not rained for six weeks and the fields are dry and cracked.",
        "Snow fell all night and covered the cars in a thick white layer.",
        "The forecast says the humid heat will last until the weekend.",
        "A cold wind blew from the north and the clouds grew dark.",
    ], "They met at the station, and it was a little chilly that day."),
    "football": ("football (soccer) matches, players, goals and teams", [
        "The striker scored twice in the second half and the crowd went wild.",
        "Their goalkeeper saved a penalty in the last minute of the match.",
        "The coach changed the team's formation after a poor first half.",
        "He kicked the ball past two defenders and shot into the corner of the net.",
        "The referee showed a red card and the home team played with ten men.",
        "After the final whistle the fans sang in the stadium for an hour.",
        "The club signed a young midfielder from a team in the second division.",
        "A corner kick was headed in at the far post to level the score.",
    ], "My brother stayed up late to watch the game, then went to bed."),
    "music": ("music: songs, instruments, singing and concerts", [
        "She practised the piano for two hours every evening before the concert.",
        "The band played their new song and the audience sang along.",
        "He tuned his guitar and strummed a few soft chords.",
        "The choir sang in four-part harmony in the old church.",
        "The drummer kept a steady beat while the violins played the melody.",
        "Their album was recorded in a small studio over three weeks.",
        "The orchestra rehearsed the symphony with the new conductor.",
        "She hummed the tune of an old folk song while she worked.",
    ], "The radio was on in the kitchen while they talked about the trip."),
    "animals": ("animals and pets: dogs, cats, birds, wildlife", [
        "The dog barked at the mail carrier and wagged its tail.",
        "A family of ducks swam across the pond behind their mother.",
        "The cat curled up on the windowsill and fell asleep in the sun.",
        "Wolves hunt in packs and can travel long distances in one night.",
        "The farmer fed the horses and cleaned out their stalls.",
        "An owl hooted from the branches of the old oak tree.",
        "The zoo's new elephant calf weighed more than a hundred kilograms.",
        "Bees carry pollen from flower to flower as they collect nectar.",
    ], "He walked to the shop, and a neighbour's dog followed him for a while."),
    "computers": ("computers and software: programs, code, bugs, the internet", [
        "The program crashed because of a bug in the memory allocation code.",
        "He installed the update and restarted the computer.",
        "She wrote a short script to rename thousands of files at once.",
        "The website was slow because the database server was overloaded.",
        "Back up your files before you upgrade the operating system.",
        "The laptop's battery lasts about eight hours on a single charge.",
        "They fixed the security hole by patching the web server.",
        "The compiler reported an error on line forty of the source file.",
    ], "She checked her email quickly before leaving for the meeting."),
    "medicine": ("medicine and health: doctors, illness, treatment, hospitals", [
        "The doctor prescribed antibiotics for the infection.",
        "He was taken to hospital with a broken leg after the fall.",
        "The nurse checked her blood pressure and temperature.",
        "Regular exercise lowers the risk of heart disease.",
        "The vaccine protects children against measles.",
        "After the surgery she needed several weeks to recover.",
        "Take two tablets a day with food, and drink plenty of water.",
        "The patient complained of a headache and a sore throat.",
    ], "He missed the party because he was feeling a bit tired."),
    "money": ("money and finance: banks, prices, loans, investments", [
        "The bank raised its interest rates on savings accounts.",
        "She paid off the loan two years early.",
        "Share prices fell sharply after the company's report.",
        "He put part of his salary into a pension fund every month.",
        "The price of petrol has risen by ten percent this year.",
        "They borrowed money to buy the house and pay for repairs.",
        "Investors moved their cash into government bonds.",
        "The shop accepts cash, cards and mobile payments.",
    ], "They bought a few things at the market and walked back along the river."),
    "travel": ("travel and transport: trains, planes, journeys, tourism", [
        "The train to the capital leaves at seven from platform four.",
        "Our flight was delayed by three hours because of fog.",
        "They rented a car and drove along the coast for a week.",
        "Remember to bring your passport and boarding pass to the airport.",
        "The ferry crosses the bay twice a day in summer.",
        "We stayed in a small hotel near the old town square.",
        "The bus was full of tourists on their way to the museum.",
        "He packed a suitcase and caught the night train to the border.",
    ], "She sent a postcard to her aunt and then went for lunch."),
    "sea": ("the sea and the ocean: waves, ships, beaches, fish", [
        "Huge waves crashed against the rocks along the shore.",
        "The fishing boat returned to the harbour with a full catch.",
        "At low tide you can walk across the sand to the island.",
        "Dolphins swam beside the ship for several miles.",
        "The sailors raised the sails as the wind picked up.",
        "Salt water had rusted the old anchor chain.",
        "Children collected shells on the beach after the storm.",
        "Deep in the ocean, strange fish glow in the dark.",
    ], "The town was quiet in the evening, and you could smell salt in the air."),
    "gardening": ("gardening and plants: flowers, seeds, soil, growing vegetables", [
        "Plant the tomato seedlings in rich soil after the last frost.",
        "She watered the roses and pulled the weeds from the flower bed.",
        "The apple tree needs pruning before the spring.",
        "Dig compost into the ground to help the vegetables grow.",
        "The seeds sprouted within a week on the sunny windowsill.",
        "He mowed the lawn and trimmed the hedge along the fence.",
        "Lettuce grows quickly and can be harvested in a few weeks.",
        "The tulip bulbs were planted in rows under the kitchen window.",
    ], "He sat on the bench outside the house and read the newspaper."),
    "space": ("space and astronomy: stars, planets, rockets, astronauts", [
        "The rocket lifted off and carried the satellite into orbit.",
        "Mars is a cold desert planet with two small moons.",
        "Through the telescope we could see the rings of Saturn.",
        "The astronauts spent six months on the space station.",
        "A comet passes close to the Sun once every seventy-six years.",
        "The galaxy contains hundreds of billions of stars.",
        "The probe sent back pictures of the far side of the Moon.",
        "Light from that star takes four years to reach the Earth.",
    ], "It was late at night, and the sky above the village was clear."),
}

NEUTRAL = [
    "He opened the door and put his keys on the table.",
    "The meeting was moved to Thursday afternoon.",
    "She wrote the address on the back of an envelope.",
    "They talked for a while and then went home.",
    "The book was on the second shelf, next to the lamp.",
    "I will call you tomorrow when I get back.",
    "The room was painted a pale shade of blue.",
    "He waited at the corner for his friend to arrive.",
    "Please sign the form and return it by Friday.",
    "The children were playing in the next room.",
    "She folded the letter and put it in her bag.",
    "We walked down the street and turned left at the church.",
]


@dataclass
class Detect:
    explanation: str
    context: str
    label: int


@dataclass
class Rank:
    contexts: list[str]
    candidates: list[str]
    answer: int


@dataclass
class Steer:
    concept: str
    text_a: str
    text_b: str
    label: int  # 1 when text_b is more about the concept


def detection_cases(seed: int = 0) -> list[Detect]:
    rng = random.Random(seed)
    names = list(TOPICS)
    cases = []
    for i, name in enumerate(names):
        explanation, sentences, _ = TOPICS[name]
        cases += [Detect(explanation, s, 1) for s in sentences[:2]]
        for j in (1, 5):  # two other topics' sentences
            other = TOPICS[names[(i + j) % len(names)]][1]
            cases.append(Detect(explanation, other[rng.randrange(2)], 0))
    return cases


def ranking_cases() -> list[Rank]:
    names = list(TOPICS)
    return [Rank(TOPICS[n][1][2:7], names, i) for i, n in enumerate(names)]


def steering_cases(seed: int = 0) -> list[Steer]:
    rng = random.Random(seed)
    cases = []
    for i, (name, (_, sentences, mild)) in enumerate(TOPICS.items()):
        neutral = NEUTRAL[i % len(NEUTRAL)]
        for weaker, stronger in ((neutral, sentences[7]), (neutral, mild), (mild, sentences[7])):
            if rng.random() < 0.5:
                cases.append(Steer(name, weaker, stronger, 1))
            else:
                cases.append(Steer(name, stronger, weaker, 0))
    return cases


# Harder, lexical/syntactic "features" tested with minimal pairs (topic held fixed): what SAE latents
# often encode, and where topical similarity does not help.
LEXICAL = {
    "negations: the words not, never, no, nobody": (
        ["I have never seen him so angry.", "She did not want to leave the party early."],
        ["I have always seen him so calm.", "She wanted to leave the party early."]),
    "numbers and quantities": (
        ["The box held 24 eggs and three spoons.", "We waited for 15 minutes at the gate."],
        ["The box held some eggs and a spoon.", "We waited for a while at the gate."]),
    "questions": (
        ["Where did you put the keys?", "Would you like some more tea?"],
        ["I put the keys on the table.", "I would like some more tea."]),
    "verbs in the past tense": (
        ["She walked to the shop and bought bread.", "They played cards and laughed all night."],
        ["She walks to the shop and buys bread.", "They play cards and laugh all night."]),
    "the speaker referring to themselves: I, me, my": (
        ["I think my brother forgot me.", "My bag is heavier than I expected."],
        ["He thinks his brother forgot him.", "Her bag is heavier than she expected."]),
    "colour words such as red, blue, green": (
        ["She wore a red coat and green boots.", "The sky turned pink and orange."],
        ["She wore a warm coat and heavy boots.", "The sky turned dark and cloudy."]),
    "words about time: days, hours, yesterday, morning": (
        ["We met on Monday morning at nine.", "Yesterday the shop closed early."],
        ["We met at the corner near the bank.", "The shop near the bank closed early."]),
    "comparisons: bigger, faster, more than": (
        ["This road is longer than the other one.", "He runs faster than his sister."],
        ["This road is long and narrow.", "He runs with his sister."]),
}


def lexical_detection_cases() -> list[Detect]:
    cases = []
    for explanation, (positives, negatives) in LEXICAL.items():
        cases += [Detect(explanation, s, 1) for s in positives] + [Detect(explanation, s, 0) for s in negatives]
    return cases
