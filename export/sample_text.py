"""The text parity is measured on when a checkpoint comes without held-out blocks and no
--validation_file is given: fixed, so that exports of the same model compare, and in both
languages tailorgpt is meant for, so that either kind of vocabulary gets a few full blocks."""

SAMPLE_DOCUMENTS = (
    "The morning train was late again, so I stood on the platform with a paper cup of tea and "
    "watched the fog lift off the river. A man beside me was reading a novel with a torn cover, "
    "turning the pages slowly, as if he had nowhere to be. When the train finally arrived, "
    "everyone pressed forward at once, and I ended up standing by the door all the way to the "
    "city, counting the bridges we crossed.",
    "To make the soup, cut two onions and three carrots into small pieces and cook them in a "
    "little butter until they are soft. Add a litre of water, a bay leaf, salt and pepper, and "
    "let it simmer for half an hour. Blend it until smooth, taste it, and add a spoonful of "
    "cream just before serving. It keeps for three days in the fridge and tastes better on the "
    "second day.",
    "Notes from the meeting: the release moves to the first week of next month, because the "
    "last tests found a problem with how files are saved when the disk is full. Anna will write "
    "the fix, Tom will review it, and we will meet again on Thursday to decide whether the new "
    "date still holds. Questions about the schedule go to the team channel, not by email.",
    "今天早上下了一场小雨，路上的行人都撑着伞，走得比平时慢。我在街角的小店买了两个包子和一杯豆浆，"
    "站在屋檐下一边吃一边看着雨水顺着台阶流下去。店主说这几天天气会一直这样，周末才会放晴。",
    "学习一门新的语言，最重要的是每天坚持一点点。可以先从简单的句子开始，把常用的词写在卡片上，"
    "走路或者坐车的时候拿出来看一看。过一段时间再读短文，遇到不认识的字就查一查，慢慢地就能读懂"
    "整篇文章了。",
    "周末我们去了城外的山上，山路不算陡，但是很长。半山腰有一座旧的亭子，大家在那里休息，喝了一些"
    "热水，吃了带来的水果。到了山顶，风很大，远处的城市看起来很小，河水像一条细细的银线。",
)
