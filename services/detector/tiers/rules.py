"""Tier 1 of the detector: fast lexical and pattern rules, one family per WildFeedback rubric.

How the rules are organised
---------------------------
* **Lexicon** (``_LEXICON``): per rubric, phrases grouped by strength (3 strong, 2 medium,
  1 weak) and tagged with flags (negatable, bare thanks, sarcasm marker, correction given...).
  Phrases made of words (English, Spanish, French, German, Portuguese, Russian...) are matched
  as token n-grams by greedy longest match, so "not bad" wins over "bad" and a phrase costs one
  dict look-up, not a regex scan. Phrases in scripts without spaces (Chinese, Japanese) and
  emoji are matched as substrings, only when the text is not plain ASCII.
* **Pattern rules** (``_PATTERNS``): the few cues that need slots ("3 years, not 2", "it's X not
  Y") are regexes, each gated by trigger words so it only runs when one of them is present.
* **Context rules** use the assistant answer and the history: an unanswered information question
  (No_Engagement) versus an answered one (NEUTRAL, confidently), a repeated previous request
  (Revision, category ``rephrase``), insisting after a refusal (Unrealistic_Expectation).
* **Resolution** (``_resolve``) turns hits into a verdict: negated praise ("not helpful")
  becomes Negative_Feedback; sarcasm (an eye-roll, "thanks for nothing", praise glued to a
  complaint with no "but") turns the praise into Negative_Feedback; bare thanks used as a
  softener before a complaint is dropped (DSAT); real praise plus a real complaint is MIXED;
  "no thanks" is a polite decline, not gratitude (NEUTRAL unless something else fires).

Text is case-folded, apostrophes are dropped ("that's" == "thats") and only the first and last
``_CLIP`` characters of a huge turn are read, so the cost per turn is bounded.

How confidence is calibrated
----------------------------
Every verdict falls into one bucket (``sat:3`` = SAT whose strongest cue is strong,
``dsat:1``, ``mixed``, ``sarcasm``, ``softener``, ``neutral:answered``, ``neutral:none``...).
The confidence is the bucket's smoothed precision of the *polarity* on the train split:
``(correct + K * prior) / (n + K)`` with ``K = 4`` pseudo-counts of a hand-set prior, so small
buckets stay near the prior (``fit_calibration``). ``CALIBRATION`` holds the numbers fitted on
``services/detector/data/train.*.jsonl`` (never dev or test), clipped to at most 0.95. The
rules were written against the first 312 train turns and dev, so precisions there are
optimistic; the 404 train turns added in December 2026 (mostly implicit feedback) were not
written against, and they pull the "no cue" bucket down to 0.35: with the default rules
threshold (0.65) those turns (~40% of the dataset) go to the next tier, every other bucket
(0.68-0.95) stands.

Known blind spots
-----------------
Implicit feedback without cue words (a bug report in plain words, "two rows get merged", "it
logs Promise {<pending>}"): such turns land in ``neutral:none`` and are left to the classifier
tier, which gets ``describe_context`` as features. Also irony without markers, Personal_Details
/ Humor / Lower_Quality (only crude cues), languages outside the covered ones, and rubric
*sets* (polarity is what the confidence is about).
"""

# The lexicon is multilingual: Cyrillic letters and full-width punctuation are intended.
# ruff: noqa: RUF001
from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.detector.judgement import TurnContext, Verdict
from services.events.schemas import DsatRubric, FeedbackCategory, Polarity, SatRubric

S = SatRubric
D = DsatRubric
Rubric = SatRubric | DsatRubric

_CLIP = 2_000  # characters read from each end of a long turn
_ASSISTANT_TAIL = 400  # characters of the assistant answer searched for a closing question


class F:
    """Bit flags a cue carries into the resolution step (plain ints: enum.IntFlag arithmetic
    is several times slower and this runs per cue)."""

    NONE = 0
    NEGATABLE = 1  # a negator just before it flips it ("not helpful")
    SARCASM = 4  # marks the whole turn as ironic (🙄, "yeah right")
    CORRECTION = 8  # the user supplies the fix ("actually", "should be")
    CLARIFY = 16  # the user asks what the assistant meant
    DECLINE = 32  # "no thanks": a polite refusal, not gratitude
    REPHRASE = 64  # the user restates their request ("i asked", "just tell me")
    CLOSING = 128  # ends the conversation
    INSIST = 256  # insists ("just do it"): Unrealistic_Expectation after a refusal


@dataclass(frozen=True, slots=True)
class Cue:
    rubric: Rubric | None  # None: a flag-only cue (e.g. "actually" as a correction marker)
    strength: int  # 3 strong, 2 medium, 1 weak
    flags: int = F.NONE


@dataclass(frozen=True, slots=True)
class Hit:
    cue: Cue
    clause: int  # index of the clause (split at sentence ends and "but"-like words)
    negated: bool = False


# --------------------------------------------------------------------------------------------
# Lexicon. Each entry: (rubric or None, strength, flags, "phrase|phrase|...").
# Write phrases naturally; apostrophes are dropped when compiling.
# --------------------------------------------------------------------------------------------
_N = F.NEGATABLE
_LEXICON: tuple[tuple[Rubric | None, int, int, str], ...] = (
    # Gratitude
    (
        S.GRATITUDE,
        3,
        F.NONE,
        "thank you so much|thanks so much|thanks a lot|thanks again|thanks a ton|"
        "thank you very much|many thanks|much appreciated|really appreciate it|i appreciate it|"
        "appreciate it|tysm|tyvm|thanks a million|thank you for the help|thanks for the help|"
        "thanks for your help|muchas gracias|mil gracias|merci beaucoup|merci bien|vielen dank|"
        "danke schön|danke schon|herzlichen dank|muito obrigado|muito obrigada|большое спасибо|"
        "огромное спасибо|非常感谢|太感谢|多谢|ありがとうございます|ありがとうございました|"
        "本当にありがとう|谢谢你|謝謝",
    ),
    (
        S.GRATITUDE,
        2,
        F.NONE,
        "thanks|thank you|thank u|thx|thnx|ty|cheers|gracias|merci|"
        "danke|obrigado|obrigada|valeu|brigado|brigada|спасибо|спс|благодарю|谢谢|感谢|ありがとう|"
        "感謝|🙏",
    ),
    # Praise
    (
        S.PRAISE,
        3,
        _N,
        "excellent|amazing|awesome|perfect|fantastic|wonderful|brilliant|"
        "love it|i love it|love this|spot on|exactly what i needed|exactly what i wanted|"
        "exactly the tone|works like a charm|youre good at this|youre the best|you rock|"
        "goosebumps|genius|superb|outstanding|incredible|excelente|perfecto|perfecta|increíble|"
        "estupendo|genial|parfait|parfaite|génial|géniale|excellent|formidable|nickel|"
        "perfekt|ausgezeichnet|wunderbar|hervorragend|klasse|spitze|perfeito|perfeita|ótimo|"
        "ótima|incrível|sensacional|отлично|идеально|прекрасно|превосходно|супер|класс|"
        "太棒了|完美|太好了|厉害|素晴らしい|完璧|最高|すごい|❤️|😍|🔥|💯|🎉|🙌|👌|👏|🤩",
    ),
    (
        S.PRAISE,
        2,
        _N,
        "great|nice|good job|well done|helpful|very helpful|so helpful|helped|"
        "helps|so cool|thats cool|pretty cool|slaps|"
        "super helpful|really helpful|very clear|so clear|crystal clear|clearer|way clearer|"
        "beautiful|"
        "keeper|neat|sweet|lovely|impressive|useful|clever|so smart|thats smart|is smart|"
        "bueno|buenísimo|muy bien|útil|chévere|"
        "bien joué|super|très bien|utile|toll|gut|sehr gut|prima|hilfreich|"
        "muito bom|muito útil|massa|top demais|хорошо|полезно|круто|здорово|"
        "很好|不错|有用|很棒|棒|好的很|いいね|良い|助かり|助かる|👍|😊|🥰|✨|⭐",
    ),
    (S.PRAISE, 1, _N, "cool|good|bien|bom|boa|schön|хорош"),
    # Acknowledgment
    (
        S.ACKNOWLEDGMENT,
        3,
        _N,
        "makes sense|make sense|that makes sense|now it makes sense|got it|gotcha|"
        "i see|i understand|understood|now it clicks|it clicks|fair enough|that matches|"
        "that explains it|my bad|my mistake|i was wrong|my fault|i misread|glad i asked|"
        "glad i checked|good thing i asked|ya veo|entiendo|"
        "entendido|tiene sentido|je vois|compris|ça a du sens|"
        "cest logique|ich verstehe|verstehe|verstanden|ergibt sinn|macht sinn|alles klar|entendi|"
        "faz sentido|saquei|понятно|понял|поняла|ясно|明白了|懂了|知道了|原来如此|なるほど|"
        "わかりました|分かりました|了解です|理解しました",
    ),
    (
        S.ACKNOWLEDGMENT,
        2,
        F.NONE,
        "ah right|oh right|agreed|exactly|thats the one|ahh|ahh ok|"
        "ah ok|oh ok|aha|i can use|passt|passt so|thats true|so true|"
        "thats right|ok good|okay good|sounds good|good to know|vale|de acuerdo|claro|dacord|"
        "daccord|entendu|stimmt|genau|okay verstanden|certo|beleza|верно|точно|明白|了解|"
        "好的明白",
    ),
    # Learning
    (
        S.LEARNING,
        3,
        F.NONE,
        "i didnt know|didnt know that|i did not know|learned something|"
        "learnt something|today i learned|now i know|i never knew|never knew that|"
        "i had no idea|had no idea|thats why|that explains|no sabía|no lo sabía|"
        "je ne savais pas|je savais pas|jai appris|wusste ich nicht|das wusste ich nicht|"
        "não sabia|aprendi|не знал|не знала|теперь знаю|学到了|涨知识|"
        "知らなかった|勉強になりました|勉強になる",
    ),
    (
        S.LEARNING,
        2,
        F.NONE,
        "interesting|fascinating|oh wow|ohh|ohhh|tell me more|til|"
        "interesante|intéressant|interessant|interessante|интересно|有意思|有趣|面白い",
    ),
    # Compliance
    (
        S.COMPLIANCE,
        3,
        _N,
        "that worked|it worked|that works|it works|works now|this works|works perfectly|"
        "that fixed it|fixed it|it runs|that did it|did the trick|made it|ordering|booking now|"
        "im booking|ill try that|ill try it|will try|will do|funciona|funcionó|ha funcionado|"
        "lo pruebo|ça marche|ça fonctionne|ca marche|a marché|marche nickel|funktioniert|"
        "hat geklappt|klappt|läuft|funcionou|deu certo|vou testar|работает|получилось|"
        "отправляю|заработало|可以了|成功了|好使|行了|試してみます|やってみます|行ってみます|"
        "できました|うまくいきました|動きました",
    ),
    (
        S.COMPLIANCE,
        2,
        _N,
        "phew|works|worked|fixed|found it|that was it|adding it|tried it|"
        "sending it|im using|ill use|going with|"
        "i went with|lo haré|je vais essayer|mache ich|vou fazer|попробую|我试试|试试",
    ),
    # Personal details (weak: only kept next to another SAT cue, see _resolve)
    (
        S.PERSONAL_DETAILS,
        1,
        F.NONE,
        "im a|i am a|my son|my daughter|my kids|my kid|my wife|"
        "my husband|my dad|my mom|my mother|my father|my boss|my teacher|my students|my cat|"
        "my dog|my team|ive been|i work as|i work at|i live in|mi hijo|mi hija|mon fils|"
        "ma fille|mein sohn|meine tochter|meu filho|minha filha|мой сын|моя дочь|我儿子|我女儿|"
        "息子|娘",
    ),
    # Humor
    (
        S.HUMOR,
        2,
        F.NONE,
        "haha|hahaha|hehe|lmao|lmfao|rofl|jaja|jajaja|jeje|mdr|kkk|kkkk|"
        "rsrs|хаха|ахах|ахаха|哈哈|笑笑|www|😂|🤣|😆|😄|😅|😜",
    ),
    (S.HUMOR, 1, F.NONE, "lol|spin doctor"),
    # Positive closure
    (
        S.POSITIVE_CLOSURE,
        3,
        F.CLOSING,
        "thats all|thats all for today|thats all i needed|"
        "thats it for now|have a nice day|have a good day|have a great day|bye|goodbye|"
        "good night|all set|im all set|nothing else|nothing more|eso es todo|"
        "eso es lo que necesitaba|"
        "hasta luego|adiós|buen día|bonne journée|bonne soirée|au revoir|cest tout|"
        "schönen tag|tschüss|das wars|das wars schon|até mais|tchau|é isso|до свидания|"
        "всё спасибо|再见|就这些|没有了|以上です|またね|さようなら",
    ),
    # Getting there
    (
        S.GETTING_THERE,
        3,
        _N,
        "getting there|much better|way better|closer|almost there|"
        "better now|thats better|on the right track|otherwise good|mucho mejor|"
        "beaucoup mieux|cest mieux|viel besser|schon besser|bem melhor|"
        "намного лучше|уже лучше|好多了|好一些|接近了|だいぶ良く|良くなった",
    ),
    (S.GETTING_THERE, 2, _N, "almost|nearly|casi|presque|quase|почти|improvement|更好|よくなった"),
    (S.GETTING_THERE, 1, _N, "better|mejor|mieux|besser|melhor|лучше"),
    # Negative feedback
    (
        D.NEGATIVE_FEEDBACK,
        3,
        F.NONE,
        "useless|terrible|awful|horrible|garbage|trash|rubbish|"
        "nonsense|stupid|dumb|pathetic|ridiculous|annoying|frustrating|infuriating|"
        "this is bad|thats bad|so bad|not helpful at all|thanks for nothing|you literally had "
        "one job|had one job|whats the point of you|what is the point of you|are you kidding|"
        "you kidding me|wtf|ffs|come on|are you serious|for gods sake|youre supposed to know|"
        "how am i supposed to|why do you always|you always|you never|make stuff up|"
        "making stuff up|made that up|unbelievable|"
        "you should know|this sucks|that sucks|you suck|waste of time|way too cringe|cringe|"
        "inútil|no sirve|no sirve para nada|pésimo|qué malo|que absurdo|qué absurdo|"
        "cest nul|nimporte quoi|inutile|débile|nutzlos|unsinn|quatsch|schrecklich|"
        "totaler mist|unbrauchbar|péssimo|horrível|absurdo|ridículo|бесполезно|"
        "бесполезный|ужасно|бред|чушь|отстой|没用|太差|垃圾|什么鬼|役に立たない|ひどい|"
        "最悪|使えない|🙄|😒|😡|🤬|😤|🤦",
    ),
    (
        D.NEGATIVE_FEEDBACK,
        2,
        F.NONE,
        "ugh|argh|not helpful|still not|nothing changes|"
        "nothing changed|nothing happens|nothing happened|generic|so generic|boring|bland|"
        "cliche|cliché|lazy|🙃|already tried|i already did|"
        "done that already|did that already|i did all of that|doesnt make sense|unhelpful|"
        "disappointing|"
        "doesnt work|does not work|didnt work|did not work|still doesnt|still not working|"
        "still wrong|still broken|not working|broken|not it|thats not it|doesnt help|didnt help|"
        "no funciona|no me sirve|ça marche pas|ne marche pas|ça ne marche pas|ça marche toujours "
        "pas|funktioniert nicht|klappt nicht|hilft nicht|não funciona|não ajudou|"
        "не работает|не помогло|不行|没用啊|不好用|動かない|だめ|ダメ|😠|😞|👎",
    ),
    (
        D.NEGATIVE_FEEDBACK,
        1,
        F.NONE,
        "error|crashes|crashed|throws|fails|weird|strange|"
        "bad|hmm no|meh|weak|whatever|wow|seriously|a bit much|too much|erro|erreur|fehler|"
        "ошибку выдает|报错|エラー",
    ),
    # Factual error
    (
        D.FACTUAL_ERROR,
        3,
        F.NONE,
        "thats wrong|that is wrong|this is wrong|its wrong|is wrong|"
        "are wrong|was wrong|wrong answer|youre wrong|you are wrong|incorrect|thats not right|"
        "not right|not correct|isnt correct|isnt right|thats not true|not true|thats false|"
        "youre mistaken|you made a mistake|miscalculated|doesnt add up|you contradicted|"
        "contradicts|contradiction|está mal|incorrecto|incorrecta|te equivocas|es falso|"
        "eso no es cierto|cest faux|faux|cest incorrect|tu te trompes|vous vous trompez|"
        "das ist falsch|falsch|stimmt nicht|das stimmt nicht|inkorrekt|está errado|errado|"
        "incorreto|incorreta|você errou|isso não é verdade|неправильно|неверно|"
        "ты ошибся|вы ошиблись|это не так|不对|错了|不正确|是错的|搞错|間違って|"
        "違います|正しくない|違うよ",
    ),
    (
        D.FACTUAL_ERROR,
        2,
        F.NONE,
        "wrong|mistake|isnt real|not real|doesnt exist|isnt a thing|"
        "not a thing|no such|ошибка|間違い",
    ),
    (D.FACTUAL_ERROR, 1, F.NONE, "i thought"),
    (D.FACTUAL_ERROR, 1, F.CORRECTION, "actually"),
    (
        D.FACTUAL_ERROR,
        2,
        F.CORRECTION,
        "should be|its actually|is actually|was actually|"
        "technically|is technically|"
        "en realidad|debería ser|en fait|devrait être|eigentlich|sollte|"
        "na verdade|deveria ser|на самом деле|должно быть|其实|应该是|実は|のはず",
    ),
    # Revision
    (
        D.REVISION,
        3,
        F.NONE,
        "try again|redo|rewrite|rephrase|regenerate|revise|once more|"
        "one more time|do it again|start over|otra vez|de nuevo|reescribe|reescríbelo|"
        "inténtalo de nuevo|encore une fois|refais|réécris|recommence|nochmal|noch einmal|"
        "schreib es um|umschreiben|de novo|outra vez|reescreva|refaça|ещё раз|еще раз|перепиши|"
        "переделай|заново|重新|再来一次|再写|改一下|もう一度|書き直|やり直",
    ),
    (
        D.REVISION,
        2,
        F.NONE,
        "can you make it|make it|change it|fix it|instead|instead of|"
        "one more that|do one more|can you do it without|other version|"
        "different version|something more|something else|something different|можно без|"
        "不想用|不要用|换成|なしで",
    ),
    (D.REVISION, 1, F.NONE, "again|without|rather|sin|sans|ohne|sem|без"),
    # Ignored
    (
        D.IGNORED,
        3,
        F.REPHRASE,
        "i literally said|i said|i asked|i already said|i just said|"
        "literally just said|you didnt even|"
        "i already told you|thats not what i asked|not what i asked|you didnt answer|"
        "you ignored|did you even read|read my question|look at my code|thats not my question|"
        "that wasnt my question|answer the question|no es lo que pregunté|"
        "te pregunté|ce nest pas ce que jai demandé|jai demandé|jai dit|das habe ich nicht gefragt|"
        "ich habe gefragt|ich sagte|não foi isso que eu perguntei|eu perguntei|eu disse|"
        "я спрашивал|я спросил|я же сказал|я не об этом|我问的是|我问的不是|没回答|我说了|"
        "答えになって|聞いたのは|質問に答えて",
    ),
    (
        D.IGNORED,
        2,
        F.NONE,
        "i know what|not what i|doesnt answer|didnt answer|off topic|irrelevant",
    ),
    # Insufficient detail
    (
        D.INSUFFICIENT_DETAIL,
        3,
        F.NONE,
        "more detail|more details|more specific|be more specific|"
        "elaborate|can you expand|expand on|go deeper|in more depth|explain more|"
        "not enough|too vague|too general|too brief|too short|need more|"
        "more examples|with examples|not just|example pls|example please|an example|"
        "some examples|specific examples|说点具体|más detalle|más detalles|"
        "más específico|plus de détails|plus précis|développe|mehr details|genauer|"
        "ausführlicher|mais detalhes|mais específico|подробнее|конкретнее|详细|具体一点|更具体|"
        "詳しく|具体的に",
    ),
    # Style
    (
        D.STYLE,
        3,
        F.CORRECTION,
        "too long|too wordy|too verbose|shorter|more concise|tone it down|"
        "reads like an ai|sounds like an ai|sounds like a robot|muy largo|très long|sehr lang|"
        "too formal|too informal|too casual|too stiff|less stiff|too cringe|no emojis|"
        "bullet points|bullets|in bullets|in a table|as a table|just the code|only the code|"
        "just the answer|less formal|more formal|more casual|simpler|too complicated|"
        "too technical|plain english|más corto|demasiado largo|plus court|"
        "trop long|kürzer|zu lang|mais curto|muito longo|короче|слишком длинно|太长|简短|"
        "短く|長すぎ",
    ),
    (D.STYLE, 2, F.CORRECTION, "sentences max|words max|sentence each|a paragraph per"),
    (D.STYLE, 1, F.CORRECTION, "max|maximum|tone|paragraph|paragraphs|reads like|sounds like"),
    # Lower quality
    (D.LOWER_QUALITY, 1, F.NONE, "chatgpt|gpt 4|gpt4|gpt 3|claude|gemini|bard|copilot|google"),
    (
        D.LOWER_QUALITY,
        3,
        F.NONE,
        "other bots|other ai|other ais|you used to|used to be better|worse than before|"
        "previous version|got worse|kinda basic|too basic|google would|google wouldve|"
        "a search engine would",
    ),
    # Unrealistic expectation (only with a refusal in the answer, see _context_hits)
    (
        None,
        2,
        F.INSIST,
        "just tell me|just write|just give me|just do it|do it anyway|"
        "i dont care|just|anyway|whatever|solo dime|simplemente|hazlo|"
        "juste|fais le|einfach|mach es|só me diz|apenas|просто|就告诉我|とにかく",
    ),
    (D.REVISION, 2, F.REPHRASE, "just tell me|just write|just give me|just write the script"),
    # Flag-only cues
    (
        D.INSUFFICIENT_DETAIL,
        2,
        F.CLARIFY,
        "what do you mean|what does that mean|what did you mean|"
        "i dont understand|i dont get it|no entiendo|je ne comprends pas|was meinst du|"
        "что ты имеешь в виду|什么意思|どういう意味|verstehe ich nicht|verstehe nicht|не понимаю|"
        "не понял|не поняла|不太懂|不懂|não entendi|no lo entiendo|わからない|举个例子|例子|例を",
    ),
    (
        None,
        1,
        F.CLARIFY,
        "meaning|"
        "why is it|why is that|why does|why not|why would|why shouldnt|why should|how come|"
        "i dont understand|i dont get it|dont get|confused|confusing|qué quieres decir|"
        "no entiendo|cest à dire|quest ce que tu veux dire|je ne comprends pas|was meinst du|"
        "was meinen sie|verstehe ich nicht|o que você quer dizer|não entendi|что ты имеешь в виду|"
        "не понял|не понимаю|什么意思|不明白|没懂|どういう意味|わからない",
    ),
    (
        None,
        1,
        F.SARCASM,
        "yeah right|sure jan|thanks for nothing|oh great|just great|"
        "great another|wow thanks|super helpful not|/s|🙄|😒|🤦|🙃",
    ),
    (
        None,
        1,
        F.DECLINE,
        "no thanks|no thank you|no thx|nah thanks|no gracias|non merci|"
        "nein danke|não obrigado|нет спасибо|不用了谢谢|いいえ結構です",
    ),
    (
        None,
        1,
        F.CORRECTION,
        "instead|use|i need|i want|should|supposed to|is only|only|"
        "in fact|de hecho|plutôt|lieber|em vez|вместо|而是|じゃなくて",
    ),
)


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words that flip a following positive cue. "no" only counts right before the cue.
_NEGATORS = _words(
    "not never hardly barely isnt wasnt arent werent dont doesnt didnt wont cant cannot "
    "couldnt wouldnt shouldnt aint nothing neither nor nada nunca tampoco pas jamais ne "
    "nicht kein keine nie não nao nem nunca не ни нет"
)
_NEGATOR_AFTER = _words("nicht pas")  # German/French negation after the verb
_NEG_WINDOW = 3

_CONTRAST = (
    r"but|however|though|although|otherwise|except|pero|aunque|sin embargo|mais|cependant|"
    r"pourtant|aber|jedoch|allerdings|sonst|mas|porém|entretanto|но|однако|зато"
)
_CJK_CONTRAST = "但是|不过|可是|但|でも|けど|しかし|ただ"
_CLAUSE_SPLIT = re.compile(
    rf"([.!?;\n。！？；]+|\b(?:{_CONTRAST})\b|{_CJK_CONTRAST})", re.IGNORECASE
)
_SENTENCE_SPLIT = re.compile(r"([.!?;\n。！？；]+)")  # fast path: no contrast word anywhere
_CONTRAST_WORDS = frozenset(w.split()[0] for w in _CONTRAST.split("|"))
_CJK_CONTRAST_HINTS = tuple(_CJK_CONTRAST.split("|"))
_WORD = re.compile(r"\w+")
_APOSTROPHES = re.compile(r"['’`´]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_QUOTE_CHARS = tuple('"“”«»「」`')
_QUOTED = re.compile(
    r'```.*?```|`[^`\n]+`|"[^"\n]{2,400}"|“[^”\n]{2,400}”|«[^»\n]{2,400}»|「[^」\n]{1,400}」', re.S
)
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]+")
_SENTENCE_END = re.compile(r"[.!?;\n。！？；]")
_WHY = _words("why whys por porque pourquoi warum wieso weshalb почему зачем")
_SUBSTRING_ONLY = re.compile(r"[^\w\s'’]|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
_QUESTION_START = _words(
    "what why how when where which who whose whom is are do does did can could would should "
    "whats hows wheres whos whys "
    "will shall qué que cómo como cuándo dónde por quoi comment pourquoi quand où est was wie "
    "warum wann wo welche welcher welches kann o quando onde qual что как почему когда где "
    "какой можно ли"
)
_ANSWER_START = _words(
    "yes yeah yep yup no nope nah sure ok okay sí si claro oui non ja nein doch sim não nao "
    "да нет ага"
)
_STOPWORDS = _words(
    "the and for with that this what how can you your are was were have has had not but "
    "from they them then than there their its just like about into more some any all one "
    "also does did doing would could should will shall which when where who why our out get "
    "got use using want need make made please thanks thank know tell give whats hows wheres "
    "whos thats dont cant isnt ive youre its yes yeah"
)

# Pattern rules: (trigger words, regex, cue). The regex runs only if a trigger word is present.
_PATTERNS: tuple[tuple[frozenset[str], re.Pattern[str], Cue], ...] = (
    (  # "3 years not 2", "30 days now, not 90"
        frozenset({"not", "no", "nicht", "pas", "não", "не"}),
        re.compile(r"\d[\w.,%]*[^.!?\n]{0,30}?\b(?:not|no|nicht|pas|não|не)\s+\d"),
        Cue(D.FACTUAL_ERROR, 2, F.CORRECTION),
    ),
    (  # "its X not Y", "it was X, not Y"
        frozenset({"its", "thats", "it", "that"}),
        re.compile(r"\b(?:its|it is|thats|that is|it was|it should be)\b[^.!?\n]{1,30}\bnot\b"),
        Cue(D.FACTUAL_ERROR, 2, F.CORRECTION),
    ),
    (  # "no, it's ...", "no it isn't"
        frozenset({"no", "nope", "nah", "non", "nein", "não", "нет"}),
        re.compile(
            r"^\W*(?:no|nope|nah|non|nein|não|нет)\b[\s,]+(?:its|it is|thats|that is|it was|the|"
            r"he|she|they|el|la|los|las|es|le|les|das|der|die|é|o|a|это)\b"
        ),
        Cue(D.FACTUAL_ERROR, 2, F.CORRECTION),
    ),
    (  # "X, not Y" / "X, nicht Y" (also Russian "a ne"): the user states the right value
        frozenset({"not", "nicht", "pas", "не"}),
        re.compile(r"\w,\s*(?:not|nicht|pas|а не)\s+\w"),
        Cue(D.FACTUAL_ERROR, 2, F.CORRECTION),
    ),
    (  # "in a struct not a map": the user restates the wanted form
        frozenset({"not"}),
        re.compile(r"\b(?:an?|as|in)\s+\w+,?\s+not\s+(?:an?|as|in)\s+\w+"),
        Cue(D.REVISION, 2, F.CORRECTION),
    ),
    (  # "too blunt", "way too formal" (not "me too", "too much better")
        frozenset({"too", "demasiado", "trop", "zu", "muito", "слишком", "太"}),
        re.compile(r"(?:\btoo|\bdemasiado|\btrop|\bzu|слишком) (?!many\b|late\b|early\b)\w{3,}"),
        Cue(D.STYLE, 2, F.CORRECTION),
    ),
    (  # "seriously?"
        frozenset({"seriously"}),
        re.compile(r"\bseriously\s*\?"),
        Cue(D.NEGATIVE_FEEDBACK, 3),
    ),
    (  # "that's it?" (wants more), not "that's it, thanks"
        frozenset({"thats", "is"}),
        re.compile(r"\b(?:thats it|is that it|thats all)\s*\?"),
        Cue(D.INSUFFICIENT_DETAIL, 3, F.CLARIFY),
    ),
    (  # a turn opening with "better" / "closer": better than before, not yet right
        frozenset({"better", "closer", "mejor", "mieux", "besser", "melhor", "лучше"}),
        re.compile(
            r"^\W*(?:(?:ok|okay|hmm|yes|yeah|ja|sí|oui|sim),? )?(?:much |way |a bit |a lot |bit )?"
            r"(?:better|closer|mejor|mieux|besser|melhor|лучше)\b"
        ),
        Cue(S.GETTING_THERE, 3, F.NEGATABLE),
    ),
    (  # "make it shorter", "make them less bad"
        frozenset({"make", "can", "could"}),
        re.compile(r"\bmake (?:it|this|them|that|the \w+) (?:sound )?(?:more|less|\w+er)\b"),
        Cue(D.REVISION, 2, F.CORRECTION),
    ),
    (  # "bullets, max 5 words"
        frozenset({"max", "maximum", "under", "at", "máximo", "maximal", "максимум"}),
        re.compile(
            r"\b(?:max|maximum|under|at most|máximo|maximal|максимум) \d+ "
            r"(?:words|sentences|lines|characters|palabras|líneas|frases|wörter|zeilen|слов|строк)"
        ),
        Cue(D.STYLE, 3, F.CORRECTION),
    ),
)

# An assistant question that only offers more help: answering it with something else is fine.
# Substrings of the folded text (apostrophes dropped): `in` checks are ~10x faster than a regex.
_OFFER = (
    "would you like", "do you want", "want me to", "shall i", "should i", "want a",
    "anything else", "let me know", "can i help", "is there anything", "quieres que",
    "te gustaría", "algo más", "voulez-vous", "veux-tu", "souhaitez-vous", "möchten sie",
    "möchtest du", "soll ich", "sonst noch", "quer que", "gostaria", "хотите", "хочешь",
    "нужно ли", "要不要", "需要我", "还有什么", "しましょうか", "いかがですか",
)  # fmt: skip
# The assistant declined or stated a limitation: insisting afterwards is unrealistic.
_REFUSAL = (
    "i cant ", "i cannot", "im not able", "i am not able", "unable to", "cant guarantee",
    "cant give", "cant make", "cant help", "cant access", "cant provide", "cant bypass",
    "as an ai", "i dont have access", "im not aware", "not possible", "no puedo",
    "je ne peux pas", "ich kann nicht", "ich kann das nicht", "não posso", "не могу", "无法",
    "不能", "できません",
)  # fmt: skip


def _phrase_key(phrase: str) -> tuple[str, ...] | str:
    """Token tuple for word phrases, the raw (case-folded) string for substring phrases."""
    folded = phrase.casefold()
    if _SUBSTRING_ONLY.search(folded.replace(" ", "")):
        return folded
    return tuple(_WORD.findall(_APOSTROPHES.sub("", folded)))


def _compile_lexicon() -> tuple[
    dict[tuple[str, ...], list[Cue]], dict[str, int], dict[str, list[tuple[str, Cue]]]
]:
    """Index the lexicon: n-gram -> cues, first word -> longest n, first char -> substrings."""
    ngrams: dict[tuple[str, ...], list[Cue]] = {}
    longest: dict[str, int] = {}
    substrings: dict[str, list[tuple[str, Cue]]] = {}
    for rubric, strength, flags, phrases in _LEXICON:
        cue = Cue(rubric, strength, flags)
        for phrase in phrases.split("|"):
            key = _phrase_key(phrase.strip())
            if isinstance(key, str):
                substrings.setdefault(key[0], []).append((key, cue))
            elif key:
                ngrams.setdefault(key, []).append(cue)
                longest[key[0]] = max(longest.get(key[0], 0), len(key))
    return ngrams, longest, substrings


_NGRAMS, _LONGEST, _SUBSTRINGS = _compile_lexicon()


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
_PRIORS: dict[str, float] = {
    "sat:3": 0.92,
    "sat:2": 0.8,
    "sat:1": 0.6,
    "dsat:3": 0.9,
    "dsat:2": 0.75,
    "dsat:1": 0.55,
    "mixed": 0.6,
    "sarcasm": 0.8,
    "softener": 0.85,
    "neutral:answered": 0.75,
    "neutral:continue": 0.65,
    "neutral:declined": 0.7,
    "neutral:none": 0.55,
    "neutral:empty": 0.3,
}
_PSEUDO_COUNT = 4.0
_CEILING = 0.95

# fit_calibration() on the train split (716 turns, data of December 2026, this tier's version 2).
CALIBRATION: dict[str, float] = {
    "sat:3": 0.95,
    "sat:2": 0.93,
    "sat:1": 0.9,
    "dsat:3": 0.93,
    "dsat:2": 0.81,
    "dsat:1": 0.68,
    "mixed": 0.71,
    "sarcasm": 0.74,
    "softener": 0.73,
    "neutral:answered": 0.82,
    "neutral:continue": 0.76,
    "neutral:declined": 0.7,
    "neutral:none": 0.35,
    "neutral:empty": 0.3,
}


def fit_calibration(
    pairs: Iterable[tuple[TurnContext, str]], *, tier: RulesTier | None = None
) -> dict[str, float]:
    """Smoothed per-bucket precision of the polarity: ``(correct + K*prior) / (n + K)``.

    ``pairs`` are (context, gold polarity) from the TRAIN split only; buckets never seen keep
    their prior. The result is rounded to two decimals and clipped to [0.05, 0.95]: rules
    are never surer than that.
    """
    rules = tier or RulesTier()
    counts: dict[str, list[int]] = {}
    for context, gold in pairs:
        judged = rules.analyse(context)
        correct, total = counts.setdefault(judged.bucket, [0, 0])
        counts[judged.bucket] = [correct + (judged.polarity.value == gold), total + 1]
    table = dict(_PRIORS)
    for bucket, (correct, total) in counts.items():
        prior = _PRIORS.get(bucket, 0.5)
        value = (correct + _PSEUDO_COUNT * prior) / (total + _PSEUDO_COUNT)
        table[bucket] = round(min(_CEILING, max(0.05, value)), 2)
    return table


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Analysis:
    """A verdict before calibration: rubrics, category and the calibration bucket."""

    sat: frozenset[SatRubric]
    dsat: frozenset[DsatRubric]
    category: FeedbackCategory
    bucket: str

    @property
    def polarity(self) -> Polarity:
        if self.sat and self.dsat:
            return Polarity.MIXED
        if self.sat:
            return Polarity.SAT
        return Polarity.DSAT if self.dsat else Polarity.NEUTRAL


@dataclass(slots=True)
class _Text:
    """A turn prepared for matching."""

    folded: str  # clipped, case-folded, apostrophes removed
    clauses: list[list[str]]  # word tokens per clause
    clause_starts: list[int]  # character offset of each clause in ``folded``
    contrast_before: list[bool]  # a "but"-like word opens the clause
    tokens: frozenset[str]
    first: str  # first word, after fillers such as "ok" or "and"
    is_question: bool


_IRONIC = frozenset({S.PRAISE, S.GRATITUDE, S.LEARNING})  # what sarcasm turns around
_FILLERS = _words("ok okay and also so then but well hmm oh ah wait y et und e и а")
_CONTINUE = _words("and also now next then what how y et und e и а")


def _clip(text: str) -> str:
    if len(text) <= 2 * _CLIP + 200:
        return text
    return f"{text[:_CLIP]}\n{text[-_CLIP:]}"


def _prepare(text: str) -> _Text:
    folded = _APOSTROPHES.sub("", _clip(text).casefold())
    if any(char in folded for char in _QUOTE_CHARS):  # quoted text is material, not feedback
        folded = _QUOTED.sub(" «q» ", folded)
    words = _WORD.findall(folded)
    tokens = frozenset(words)
    has_contrast = not _CONTRAST_WORDS.isdisjoint(tokens) or (
        not folded.isascii() and any(hint in folded for hint in _CJK_CONTRAST_HINTS)
    )
    if has_contrast:
        parts = _CLAUSE_SPLIT.split(folded)
    elif _SENTENCE_END.search(folded):
        parts = _SENTENCE_SPLIT.split(folded)
    else:  # one clause: reuse the tokens
        return _text(folded, [words], [0], [False], tokens)
    clauses: list[list[str]] = []
    starts: list[int] = []
    contrast: list[bool] = []
    offset = 0
    pending_contrast = False
    for i, part in enumerate(parts):
        if i % 2 == 1:  # a delimiter captured by the split
            pending_contrast = part[0].isalpha()
        else:
            clauses.append(_WORD.findall(part))
            starts.append(offset)
            contrast.append(pending_contrast)
            pending_contrast = False
        offset += len(part)
    return _text(folded, clauses, starts, contrast, tokens)


def _text(
    folded: str,
    clauses: list[list[str]],
    starts: list[int],
    contrast: list[bool],
    tokens: frozenset[str],
) -> _Text:
    openers = [_opener(c) for c in clauses if c]
    first = openers[0] if openers else ""
    is_question = "?" in folded or "？" in folded or not _QUESTION_START.isdisjoint(openers)
    return _Text(folded, clauses, starts, contrast, tokens, first, is_question)


def _opener(words: list[str]) -> str:
    """The first word of a clause, skipping one filler ("ok", "and", "wait")."""
    return words[1] if words[0] in _FILLERS and len(words) > 1 else words[0]


def _lexicon_hits(prepared: _Text) -> list[Hit]:
    """Greedy longest-match lexicon look-up per clause, then substrings and gated patterns."""
    hits: list[Hit] = []
    for index, words in enumerate(prepared.clauses):
        i, n_words = 0, len(words)
        while i < n_words:
            span = _LONGEST.get(words[i], 0)
            if not span:
                i += 1
                continue
            matched = 0
            for n in range(min(span, n_words - i), 0, -1):
                cues = _NGRAMS.get(tuple(words[i : i + n]))
                if cues:
                    negated = _is_negated(words, i, i + n)
                    hits.extend(Hit(cue, index, negated) for cue in cues)
                    matched = n
                    break
            i += matched or 1
    if not prepared.folded.isascii():
        folded = prepared.folded
        for char in set(folded).intersection(_SUBSTRINGS):
            for phrase, cue in _SUBSTRINGS[char]:
                at = folded.find(phrase)
                if at >= 0:
                    hits.append(Hit(cue, _clause_at(prepared, at)))
    for triggers, pattern, cue in _PATTERNS:
        if not triggers.isdisjoint(prepared.tokens):
            match = pattern.search(prepared.folded)
            if match:
                hits.append(Hit(cue, _clause_at(prepared, match.start())))
    return hits


def _is_negated(words: list[str], start: int, end: int) -> bool:
    before = words[max(0, start - _NEG_WINDOW) : start]
    if any(w in _NEGATORS for w in before) or (start > 0 and words[start - 1] == "no"):
        return True
    return end < len(words) and words[end] in _NEGATOR_AFTER


def _clause_at(prepared: _Text, offset: int) -> int:
    return max(0, bisect_right(prepared.clause_starts, offset) - 1)


def _content_tokens(folded: str) -> set[str]:
    """Content words (and CJK character bigrams) of already case-folded text."""
    words = {w for w in _WORD.findall(folded) if len(w) > 2 and w not in _STOPWORDS}
    if folded.isascii():
        return words
    for run in _CJK_RUN.findall(folded):  # no spaces: use character bigrams
        words.update(run[k : k + 2] for k in range(len(run) - 1))
    return words


def _fold(text: str) -> str:
    return _APOSTROPHES.sub("", _clip(text).casefold())


def _contains_any(folded: str, phrases: tuple[str, ...]) -> bool:
    return any(phrase in folded for phrase in phrases)


def _closing_question(answer: str) -> str | None:
    """The question the assistant ended on (within its last two sentences), if any."""
    tail = answer[-_ASSISTANT_TAIL:]
    mark = max(tail.rfind("?"), tail.rfind("？"))
    if mark < 0:
        return None
    after = tail[mark + 1 :]
    if len(_SENTENCE_END.findall(after)) > 1 or "```" in after:
        return None
    start = max(tail.rfind(p, 0, mark) for p in (".", "!", "\n", "。", ":", "?")) + 1
    return tail[start : mark + 1]


def _context_hits(context: TurnContext, prepared: _Text, hits: list[Hit]) -> tuple[list[Hit], bool]:
    """Hits that need the assistant answer or the history; also whether the user answered it.

    * The answer ended on an information question (not an offer such as "would you like..."):
      a reply that is not a question, shares words with it or starts with yes/no answers it
      (NEUTRAL); a new, unrelated question without any SAT cue ignores it (No_Engagement).
    * Insisting ("just do it") after a refusal in the answer: Unrealistic_Expectation.
    * Repeating the previous user message: Revision (category rephrase).
    * A "why ..." question about words of the answer: Insufficient_Detail, clarification.
    """
    extra: list[Hit] = []
    answered = False
    answer = context.previous_assistant or ""
    user_words = _content_tokens(prepared.folded)
    question = _closing_question(answer) if answer else None
    if question is not None:
        if not prepared.is_question or prepared.first in _ANSWER_START:
            answered = True  # a statement or a yes/no reply answers it
        elif not _contains_any(_fold(question), _OFFER):  # a new question after an offer is fine
            if _content_tokens(_fold(question)) & user_words:
                answered = True
            elif not any(isinstance(h.cue.rubric, SatRubric) for h in hits):
                extra.append(Hit(Cue(D.NO_ENGAGEMENT, 1), 0))
    insists = any(h.cue.flags & F.INSIST for h in hits)
    if insists and answer and _contains_any(_fold(answer[-_CLIP:]), _REFUSAL):
        extra.append(Hit(Cue(D.UNREALISTIC_EXPECTATION, 2, F.REPHRASE), 0))
    previous_user = next((m.content for m in reversed(context.history) if m.role == "user"), None)
    if previous_user is not None and _repeats(previous_user, prepared.folded, user_words):
        extra.append(Hit(Cue(D.REVISION, 2, F.REPHRASE), 0))
    why = prepared.first in _WHY and prepared.is_question
    echo = prepared.is_question and len(prepared.folded) <= 25 and prepared.folded.isascii()
    if (why or echo) and not answered and answer and user_words & _content_tokens(_fold(answer)):
        extra.append(Hit(Cue(D.INSUFFICIENT_DETAIL, 1, F.CLARIFY), 0))
    return extra, answered


def describe_context(context: TurnContext) -> list[str]:
    """What the rules know about a turn's context, as coarse pseudo-words for a learned model
    (the classifier tier's ``lexical`` features): whether the answer ended on an information
    question or an offer, whether it refused, how much of the user's vocabulary comes from the
    answer and from the user's previous message (in quarters), and a missing answer."""
    answer = context.previous_assistant or ""
    if not answer:
        return ["<ctx:no-answer>"]
    out: list[str] = []
    question = _closing_question(answer)
    if question is not None:
        out.append("<ctx:asked-offer>" if _contains_any(_fold(question), _OFFER) else "<ctx:asked>")
    if _contains_any(_fold(answer[-_CLIP:]), _REFUSAL):
        out.append("<ctx:refusal>")
    user = context.user if isinstance(context.user, str) else ""
    user_words = _content_tokens(_fold(user))
    if user_words:
        from_answer = len(user_words & _content_tokens(_fold(answer))) / len(user_words)
        out.append(f"<ctx:from-answer:{min(3, int(from_answer * 4))}>")
        previous = next((m.content for m in reversed(context.history) if m.role == "user"), None)
        if previous:
            repeated = len(user_words & _content_tokens(_fold(previous))) / len(user_words)
            out.append(f"<ctx:from-previous:{min(3, int(repeated * 4))}>")
    return out


def _repeats(before: str, now: str, now_words: set[str]) -> bool:
    """The user asks (nearly) the same thing as in their previous message."""
    if len(now_words) < 3:
        return _fold(before).strip() == now.strip()
    shared = _content_tokens(_fold(before)) & now_words
    return len(shared) >= 3 and len(shared) >= 0.6 * len(now_words)


def _resolve(prepared: _Text, hits: list[Hit], answered: bool) -> Analysis:
    """Hits -> rubrics (negation, sarcasm, softeners, weak cues), category and bucket."""
    flags = F.NONE
    for hit in hits:
        flags |= hit.cue.flags
    sat: dict[SatRubric, int] = {}
    dsat: dict[DsatRubric, int] = {}
    sat_clauses: set[int] = set()
    dsat_clauses: set[int] = set()
    strong_dsat = {
        h.clause for h in hits if isinstance(h.cue.rubric, DsatRubric) and h.cue.strength == 3
    }
    for hit in hits:
        rubric, strength = hit.cue.rubric, hit.cue.strength
        if isinstance(rubric, SatRubric) and hit.negated and hit.cue.flags & F.NEGATABLE:
            rubric, strength = D.NEGATIVE_FEEDBACK, 2  # "not helpful", "doesn't work"
        if isinstance(rubric, SatRubric):
            if hit.clause in strong_dsat and strength <= 2 and rubric not in _IRONIC:
                continue  # "that's not right, it only works when...": the complaint wins
            if prepared.contrast_before[hit.clause]:
                strength = max(strength, 2)  # "..., but the rest slaps", "otherwise good"
            if rubric is S.GRATITUDE and flags & F.DECLINE:
                continue  # "no thanks" declines an offer, it does not thank
            sat[rubric] = max(sat.get(rubric, 0), strength)
            sat_clauses.add(hit.clause)
        elif isinstance(rubric, DsatRubric):
            dsat[rubric] = max(dsat.get(rubric, 0), strength)
            dsat_clauses.add(hit.clause)
    complaint = _complaint_across_contrast(prepared, sat, sat_clauses, dsat_clauses)
    if complaint is not None:
        dsat[D.NEGATIVE_FEEDBACK] = max(dsat.get(D.NEGATIVE_FEEDBACK, 0), 2)
        dsat_clauses.add(complaint)
    _drop_weak(sat, dsat, prepared, sat_clauses, dsat_clauses)
    bucket = ""
    if sat and dsat:
        bucket, sat, dsat = _resolve_both(prepared, flags, sat, dsat, sat_clauses | dsat_clauses)
    elif flags & F.SARCASM and (sat or dsat):  # "great, another wrong answer", "wow. 🙄"
        bucket, sat, dsat = "sarcasm", {}, {**dsat, D.NEGATIVE_FEEDBACK: 3}
    bucket = bucket or _bucket(sat, dsat, flags, answered, prepared)
    if sat and not dsat and not prepared.is_question and _is_short_close(prepared, sat):
        sat[S.POSITIVE_CLOSURE] = max(sat.get(S.POSITIVE_CLOSURE, 0), 1)
    category = _category(sat, dsat, flags, prepared)
    return Analysis(frozenset(sat), frozenset(dsat), category, bucket)


def _complaint_across_contrast(
    prepared: _Text, sat: Mapping[SatRubric, int], sat_clauses: set[int], dsat_clauses: set[int]
) -> int | None:
    """The clause of a complaint hidden behind a "but": praise, then "but" and a clause without
    praise ("closer, but still not compiling", "thanks but X is technically Y"), or the
    reverse order ("X is weak, but the rest is great")."""
    if not sat or set(sat) <= {S.POSITIVE_CLOSURE, S.PERSONAL_DETAILS}:
        return None
    plain = [
        i
        for i, words in enumerate(prepared.clauses)
        if len(words) >= 2 and i not in sat_clauses and i not in dsat_clauses
    ]
    for i in plain:
        after_praise = prepared.contrast_before[i] and any(c < i for c in sat_clauses)
        before_praise = any(c > i and prepared.contrast_before[c] for c in sat_clauses)
        if after_praise or (before_praise and set(sat) != {S.GRATITUDE}):
            return i
    return None


def _drop_weak(
    sat: dict[SatRubric, int],
    dsat: dict[DsatRubric, int],
    prepared: _Text,
    sat_clauses: set[int],
    dsat_clauses: set[int],
) -> None:
    """Weak cues only count where nothing contradicts them."""
    if S.PERSONAL_DETAILS in sat and len(sat) == 1:
        del sat[S.PERSONAL_DETAILS]  # sharing details is only a SAT signal next to another
    apart = not sat_clauses & dsat_clauses  # "#1 is good. #2 too long": both count
    if sat and max(sat.values()) == 1 and ((dsat and not apart) or prepared.is_question):
        sat.clear()
    if dsat and max(dsat.values()) == 1 and sat and max(sat.values()) >= 2:
        dsat.clear()


def _resolve_both(
    prepared: _Text,
    flags: int,
    sat: dict[SatRubric, int],
    dsat: dict[DsatRubric, int],
    clauses: set[int],
) -> tuple[str, dict[SatRubric, int], dict[DsatRubric, int]]:
    """Both sides fired: sarcasm, a thanks-softener, or a genuinely mixed turn.

    * sarcasm marker anywhere: the praise is ironic -> DSAT (Negative_Feedback);
    * only thanks (and closure) on the SAT side: a softener ("thanks, but X is wrong") -> DSAT;
    * praise glued to a complaint in one clause with no "but" ("great, another wrong
      answer") -> sarcasm -> DSAT;
    * otherwise (real praise, a "but", a second sentence): MIXED.
    """
    negative = dict(dsat)
    if flags & F.SARCASM:
        negative[D.NEGATIVE_FEEDBACK] = 3
        return "sarcasm", {}, negative
    if set(sat) <= {S.GRATITUDE, S.POSITIVE_CLOSURE}:
        return "softener", {}, negative
    glued = len(clauses) == 1 and set(sat) <= _IRONIC
    if glued and max(dsat.values()) >= 2:
        negative[D.NEGATIVE_FEEDBACK] = max(negative.get(D.NEGATIVE_FEEDBACK, 0), 2)
        return "sarcasm", {}, negative
    return "mixed", sat, dsat


def _bucket(
    sat: Mapping[SatRubric, int],
    dsat: Mapping[DsatRubric, int],
    flags: int,
    answered: bool,
    prepared: _Text,
) -> str:
    if sat:
        return f"sat:{max(sat.values())}"
    if dsat:
        return f"dsat:{max(dsat.values())}"
    if flags & F.DECLINE:
        return "neutral:declined"
    if answered:
        return "neutral:answered"
    return "neutral:continue" if prepared.first in _CONTINUE else "neutral:none"


def _is_short_close(prepared: _Text, sat: Mapping[SatRubric, int]) -> bool:
    """A very short thanks/praise turn with nothing else ends the exchange ("cool ty")."""
    words = sum(len(c) for c in prepared.clauses)
    strong = sat.get(S.GRATITUDE, 0) >= 2 or sat.get(S.PRAISE, 0) >= 3
    return strong and words <= 3 and S.COMPLIANCE not in sat


def _category(
    sat: Mapping[SatRubric, int], dsat: Mapping[DsatRubric, int], flags: int, prepared: _Text
) -> FeedbackCategory:
    """Don-Yehiya category from the rubrics and the flags of the cues that fired."""
    if not dsat:
        return FeedbackCategory.POSITIVE if sat else FeedbackCategory.NONE
    if set(dsat) == {D.NO_ENGAGEMENT}:
        return FeedbackCategory.NONE
    restated = {D.REVISION, D.UNREALISTIC_EXPECTATION, D.IGNORED} & set(dsat)
    if flags & F.REPHRASE and restated:
        return FeedbackCategory.REPHRASE
    if flags & F.CLARIFY or (D.INSUFFICIENT_DETAIL in dsat and prepared.is_question):
        return FeedbackCategory.CLARIFICATION
    fixing = {D.STYLE, D.REVISION, D.INSUFFICIENT_DETAIL} & set(dsat)
    if flags & F.CORRECTION or fixing or S.GETTING_THERE in sat:
        return FeedbackCategory.AWARE_WITH_CORRECTION
    return FeedbackCategory.AWARE_WITHOUT_CORRECTION


class RulesTier:
    """Tier 1: deterministic lexical and pattern rules (see the module docstring).

    ``calibration`` maps a bucket to the confidence reported for it (default: ``CALIBRATION``,
    fitted on the train split). ``judge`` is pure: the same input gives the same verdicts.
    """

    name = "rules"
    version = "2"

    def __init__(self, calibration: Mapping[str, float] | None = None) -> None:
        self.calibration = dict(CALIBRATION if calibration is None else calibration)

    def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        return [self.judge_one(context) for context in contexts]

    def judge_one(self, context: TurnContext) -> Verdict:
        judged = self.analyse(context)
        confidence = self.calibration.get(judged.bucket, _PRIORS.get(judged.bucket, 0.5))
        return Verdict(judged.sat, judged.dsat, judged.category, confidence, self.name)

    def analyse(self, context: TurnContext) -> Analysis:
        """Rubrics, category and calibration bucket of one turn (never raises on odd text)."""
        text = context.user if isinstance(context.user, str) else ""
        if not text.strip():
            return Analysis(frozenset(), frozenset(), FeedbackCategory.NONE, "neutral:empty")
        prepared = _prepare(text)
        hits = _lexicon_hits(prepared)
        extra, answered = _context_hits(context, prepared, hits)
        return _resolve(prepared, hits + extra, answered)
