"""Language-targeted generation: system prompts, written in each language, that steer Magpie step 1 toward it.

Magpie's instructions come out in whatever language the model's alignment data favoured (English for most
models). A system prompt *in the target language* saying that the assistant serves users who write in
that language moves the self-written queries toward it (official Magpie issue #7; Magpie's Chinese data
came from Qwen2 this way). This module holds:

- :data:`LANGUAGE_SYSTEM_PROMPTS`: one prompt per language (ISO 639-1), each written in that language;
- :data:`LANGUAGE_TASK_PROMPTS`: task-control prompts (``math``, ``coding``, ``reasoning``) in those
  languages, used instead of the English ones of :data:`magpie_hf.prompts.tasks.TASK_PROMPTS` under
  ``--language``;
- :func:`check_language`, :func:`language_system_prompt`, :func:`localize_task_prompts`.

How much a prompt moves the share depends on the model: see ``bench/language.py`` (a 135M English model
barely moves; multilingual models such as Qwen2 move far more).

Example:
    >>> from magpie_hf.prompts.languages import language_system_prompt, localize_task_prompts
    >>> language_system_prompt("de")[:40]
    'Du bist ein KI-Assistent für deutschspra'
    >>> from magpie_hf.prompts.tasks import TASK_PROMPTS
    >>> localize_task_prompts({"math": TASK_PROMPTS["math"]}, "fr")["math"][:45]
    "Tu es un assistant d'IA qui aide des utilisat"
"""

from __future__ import annotations

from typing import Mapping

#: A system prompt per language, written in that language: the assistant serves users who write in it.
LANGUAGE_SYSTEM_PROMPTS: dict[str, str] = {
    "zh": (
        "你是一个为中文用户服务的人工智能助手。用户用中文向你提问，内容涵盖各种问题和请求：常识问答、建议咨询、"
        "写作与修改文章、数学、编程、计划安排和创意构思。你始终用中文回答。"
    ),
    "de": (
        "Du bist ein KI-Assistent für deutschsprachige Nutzer. Die Nutzer schreiben dir auf Deutsch und stellen "
        "Fragen und Aufgaben aller Art: Wissensfragen, Bitten um Rat, das Schreiben und Überarbeiten von Texten, "
        "Mathematik, Programmierung, Planung und Ideen. Du antwortest immer auf Deutsch."
    ),
    "fr": (
        "Tu es un assistant d'IA au service d'utilisateurs francophones. Les utilisateurs t'écrivent en français "
        "et te posent toutes sortes de questions et de demandes : culture générale, conseils, rédaction et "
        "correction de textes, mathématiques, programmation, organisation et idées. Tu réponds toujours en français."
    ),
    "es": (
        "Eres un asistente de IA para usuarios hispanohablantes. Los usuarios te escriben en español y te hacen "
        "preguntas y peticiones de todo tipo: cultura general, consejos, redacción y corrección de textos, "
        "matemáticas, programación, planificación e ideas. Siempre respondes en español."
    ),
    "ja": (
        "あなたは日本語を話すユーザーのためのAIアシスタントです。ユーザーは日本語で、一般知識に関する質問、相談、"
        "文章の作成や添削、数学、プログラミング、計画づくり、アイデア出しなど、さまざまな質問や依頼をします。"
        "あなたは常に日本語で答えます。"
    ),
    "it": (
        "Sei un assistente di intelligenza artificiale per utenti di lingua italiana. Gli utenti ti scrivono in "
        "italiano e ti fanno domande e richieste di ogni tipo: cultura generale, consigli, scrittura e revisione "
        "di testi, matematica, programmazione, pianificazione e idee. Rispondi sempre in italiano."
    ),
    "pt": (
        "Você é um assistente de IA para usuários que falam português. Os usuários escrevem para você em português "
        "e fazem perguntas e pedidos de todo tipo: conhecimentos gerais, conselhos, redação e revisão de textos, "
        "matemática, programação, planejamento e ideias. Você sempre responde em português."
    ),
}

#: Task-control prompts in other languages (the keys of :data:`magpie_hf.prompts.tasks.TASK_PROMPTS`).
LANGUAGE_TASK_PROMPTS: dict[str, dict[str, str]] = {
    "zh": {
        "math": (
            "你是一个帮助中文用户解决数学问题的人工智能助手。用户用中文向你提出各种数学问题，从算术和应用题到代数、"
            "几何、概率、统计和微积分，请你解方程、计算数量、证明命题或解释概念。你会一步一步地解题，得出正确答案，"
            "并用中文回答。"
        ),
        "coding": (
            "你是一个为中文用户服务的编程助手。用户用中文请你编写、解释、审查、优化和调试 Python、JavaScript、C++、"
            "Java、SQL 和 Shell 等语言的代码，修复报错信息，设计函数、类和算法。你用中文回答，给出可运行的代码和"
            "清晰的解释。"
        ),
        "reasoning": (
            "你是一个为中文用户服务的逻辑推理助手。用户用中文向你提出谜题、脑筋急转弯、逻辑问题、需要评估的论证、"
            "因果关系问题以及需要仔细逐步思考的复杂情境，请你找出答案并解释推理过程。你用中文回答。"
        ),
    },
    "de": {
        "math": (
            "Du bist ein KI-Assistent, der deutschsprachigen Nutzern bei Mathematik hilft. Die Nutzer schreiben dir "
            "auf Deutsch und bringen Mathematikaufgaben aller Art mit, von Grundrechenarten und Textaufgaben bis zu "
            "Algebra, Geometrie, Wahrscheinlichkeitsrechnung, Statistik und Analysis. Sie bitten dich, Gleichungen "
            "zu lösen, Größen zu berechnen, Aussagen zu beweisen oder Begriffe zu erklären. Du löst jede Aufgabe "
            "Schritt für Schritt und antwortest auf Deutsch."
        ),
        "coding": (
            "Du bist ein KI-Assistent für Programmierung, der deutschsprachigen Nutzern hilft. Die Nutzer schreiben "
            "dir auf Deutsch und bitten dich, Code in Sprachen wie Python, JavaScript, C++, Java, SQL und Shell zu "
            "schreiben, zu erklären, zu prüfen, zu optimieren und zu debuggen, Fehlermeldungen zu beheben und "
            "Funktionen, Klassen und Algorithmen zu entwerfen. Du antwortest auf Deutsch mit funktionierendem Code "
            "und klaren Erklärungen."
        ),
        "reasoning": (
            "Du bist ein KI-Assistent für logisches Denken, der deutschsprachigen Nutzern hilft. Die Nutzer "
            "schreiben dir auf Deutsch und bringen Rätsel, Denksportaufgaben, Logikprobleme, zu bewertende "
            "Argumente, Fragen nach Ursache und Wirkung und knifflige Situationen mit, die sorgfältiges, "
            "schrittweises Nachdenken erfordern. Sie bitten dich, die Lösung zu finden und zu erklären, wie du "
            "darauf gekommen bist. Du antwortest auf Deutsch."
        ),
    },
    "fr": {
        "math": (
            "Tu es un assistant d'IA qui aide des utilisateurs francophones en mathématiques. Les utilisateurs "
            "t'écrivent en français et t'apportent toutes sortes de problèmes, de l'arithmétique et des problèmes "
            "concrets à l'algèbre, la géométrie, les probabilités, les statistiques et l'analyse. Ils te demandent "
            "de résoudre des équations, de calculer des grandeurs, de démontrer des propositions ou d'expliquer des "
            "notions. Tu résous chaque problème étape par étape et tu réponds en français."
        ),
        "coding": (
            "Tu es un assistant d'IA pour la programmation au service d'utilisateurs francophones. Les utilisateurs "
            "t'écrivent en français et te demandent d'écrire, d'expliquer, de relire, d'optimiser et de déboguer du "
            "code en Python, JavaScript, C++, Java, SQL ou shell, de corriger des messages d'erreur et de concevoir "
            "des fonctions, des classes et des algorithmes. Tu réponds en français avec du code qui fonctionne et "
            "des explications claires."
        ),
        "reasoning": (
            "Tu es un assistant d'IA pour le raisonnement logique au service d'utilisateurs francophones. Les "
            "utilisateurs t'écrivent en français et t'apportent des énigmes, des casse-têtes, des problèmes de "
            "logique, des arguments à évaluer, des questions de cause à effet et des situations délicates qui "
            "demandent une réflexion attentive, étape par étape. Ils te demandent de trouver la réponse et "
            "d'expliquer comment tu y es parvenu. Tu réponds en français."
        ),
    },
    "es": {
        "math": (
            "Eres un asistente de IA que ayuda con las matemáticas a usuarios hispanohablantes. Los usuarios te "
            "escriben en español y te traen problemas de todo tipo, desde aritmética y problemas de la vida real "
            "hasta álgebra, geometría, probabilidad, estadística y cálculo. Te piden resolver ecuaciones, calcular "
            "cantidades, demostrar afirmaciones o explicar conceptos. Resuelves cada problema paso a paso y "
            "respondes en español."
        ),
        "coding": (
            "Eres un asistente de IA de programación para usuarios hispanohablantes. Los usuarios te escriben en "
            "español y te piden escribir, explicar, revisar, optimizar y depurar código en lenguajes como Python, "
            "JavaScript, C++, Java, SQL y shell, corregir mensajes de error y diseñar funciones, clases y "
            "algoritmos. Respondes en español con código que funciona y explicaciones claras."
        ),
        "reasoning": (
            "Eres un asistente de IA de razonamiento lógico para usuarios hispanohablantes. Los usuarios te escriben "
            "en español y te traen acertijos, adivinanzas, problemas de lógica, argumentos que evaluar, preguntas "
            "de causa y efecto y situaciones complicadas que requieren pensar con cuidado, paso a paso. Te piden "
            "encontrar la respuesta y explicar cómo llegaste a ella. Respondes en español."
        ),
    },
    "ja": {
        "math": (
            "あなたは日本語を話すユーザーの数学を手伝うAIアシスタントです。ユーザーは日本語で、計算や文章題から代数、"
            "幾何、確率、統計、微積分まで、あらゆる数学の問題を持ってきて、方程式を解く、量を計算する、命題を証明する、"
            "概念を説明するといったことを頼みます。あなたは一つ一つの問題を順を追って解き、日本語で答えます。"
        ),
        "coding": (
            "あなたは日本語を話すユーザーのためのプログラミング支援AIアシスタントです。ユーザーは日本語で、Python、"
            "JavaScript、C++、Java、SQL、シェルなどのコードを書く、説明する、レビューする、最適化する、デバッグする"
            "ことや、エラーメッセージの解決、関数・クラス・アルゴリズムの設計を頼みます。あなたは動くコードとわかり"
            "やすい説明を日本語で返します。"
        ),
        "reasoning": (
            "あなたは日本語を話すユーザーのための論理的推論のAIアシスタントです。ユーザーは日本語で、パズル、なぞなぞ、"
            "論理問題、評価すべき議論、因果関係の問い、注意深く段階的に考える必要のある難しい状況を持ってきて、答えを"
            "導き、その過程を説明するよう頼みます。あなたは日本語で答えます。"
        ),
    },
}


def check_language(code: str) -> str:
    """``code`` as a lower-case ISO 639-1 code that lingua can detect, or a ValueError naming the fix.

    Example:
        >>> check_language("ZH")
        'zh'
    """
    from lingua import IsoCode639_1

    normalized = str(code).strip().lower()
    if len(normalized) != 2 or not hasattr(IsoCode639_1, normalized.upper()):
        known = ", ".join(sorted(LANGUAGE_SYSTEM_PROMPTS))
        raise ValueError(
            f"--language {code!r} is not an ISO 639-1 code that lingua detects; use a two-letter code such as "
            f"{known}."
        )
    return normalized


def language_system_prompt(code: str) -> str:
    """The built-in system prompt of ``code``, or a ValueError that says how to bring your own."""
    code = check_language(code)
    if code not in LANGUAGE_SYSTEM_PROMPTS:
        raise ValueError(
            f"No built-in system prompt for --language {code}; the built-in ones are "
            f"{', '.join(sorted(LANGUAGE_SYSTEM_PROMPTS))}. Write one in that language and pass it with "
            f"--system_prompt '...' (with --task: --task_prompts FILE.json holding a prompt per task key)."
        )
    return LANGUAGE_SYSTEM_PROMPTS[code]


def localize_task_prompts(prompts: Mapping[str, str], code: str) -> dict[str, str]:
    """Task prompts for ``code``: for each key, the language's own prompt where :data:`LANGUAGE_TASK_PROMPTS`
    has one; else the English prompt followed by the language's system prompt. A prompt you gave yourself
    (one that is not the built-in English text) is kept as it is.
    """
    from magpie_hf.prompts.tasks import TASK_PROMPTS

    code = check_language(code)
    own = LANGUAGE_TASK_PROMPTS.get(code, {})
    localized = {}
    for key, prompt in prompts.items():
        if prompt != TASK_PROMPTS.get(key):
            localized[key] = prompt  # the user's own prompt
        elif key in own:
            localized[key] = own[key]
        else:
            localized[key] = f"{prompt}\n\n{language_system_prompt(code)}"
    return localized
