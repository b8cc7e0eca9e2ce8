"""``magpie-hf template MODEL_OR_PATH``: print the Magpie pieces derived from a model's chat template (the
pre-query template, stops, system block, response prompt) without loading the model
(:func:`magpie_hf.templates.derive_templates`).

Example:
    $ magpie-hf template HuggingFaceTB/SmolLM2-135M-Instruct
    $ magpie-hf template Qwen/Qwen3-8B --chat-template-kwargs '{"enable_thinking": false}' --json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``magpie-hf template MODEL_OR_PATH`` (prints the derived pieces of a model's chat format)."""
    parser = subparsers.add_parser(
        "template",
        help="show the Magpie pre-query template, stops and prompts derived from a model's chat template",
        description="Load only the tokenizer of MODEL_OR_PATH and print the derived Magpie template pieces.",
    )
    parser.add_argument("model", metavar="MODEL_OR_PATH", help="Hub model id or local directory")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL_OR_PATH")
    parser.add_argument("--system-prompt", default=None, help="system prompt to put before the user turn")
    parser.add_argument(
        "--no-default-system-prompt",
        dest="keep_default_system_prompt",
        action="store_false",
        help="drop the system block the template injects by itself (Llama-3.1, Qwen2, SmolLM2)",
    )
    parser.add_argument(
        "--pre-query-template",
        default=None,
        help="explicit raw pre-query text, BOS included; overrides the derived one ('\\n' means newline)",
    )
    parser.add_argument(
        "--chat-template-kwargs",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='template variables for every rendering, as a JSON object, e.g. \'{"enable_thinking": false}\'',
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code")
    parser.add_argument("--json", action="store_true", help="print the provenance record as JSON")
    parser.set_defaults(func=_run_cli)


def _json_object(text: str) -> dict[str, Any]:
    """``--chat-template-kwargs``: a JSON object (:func:`magpie_hf.recipe.parser.parse_json_object`), or a usage
    error that shows the expected form."""
    from magpie_hf.recipe.parser import parse_json_object

    try:
        return parse_json_object(text, "--chat-template-kwargs")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _unescape(text: str | None) -> str | None:
    """Let shell users write newlines and tabs as ``\\n`` and ``\\t`` in ``--pre-query-template``."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def _run_cli(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from magpie_hf.templates import ChatTemplateError, derive_templates, encode

    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.gguf_file:
        kwargs["gguf_file"] = args.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(args.model, **kwargs)
    try:
        templates = derive_templates(
            tokenizer,
            system_prompt=args.system_prompt,
            keep_default_system_prompt=args.keep_default_system_prompt,
            pre_query_template=_unescape(args.pre_query_template),
            chat_template_kwargs=args.chat_template_kwargs,
        )
    except ChatTemplateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(templates.to_record(), indent=2, ensure_ascii=False))
        return 0
    ids = encode(tokenizer, templates.pre_query)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    sample = [{"role": "user", "content": "Hello!"}]
    lines = [
        f"model:             {args.model}" + (f" ({args.gguf_file})" if args.gguf_file else ""),
        f"source:            {templates.source}" + (f" (overrides: {', '.join(templates.overrides)})" if templates.overrides else ""),
        f"pre_query:         {templates.pre_query!r}",
        f"pre_query ids:     {ids} (BOS {tokenizer.bos_token!r} x{ids.count(bos_id) if bos_id is not None else 0})",
        f"stop_strings:      {templates.stop_strings!r}",
        f"stop_token_ids:    {templates.stop_token_ids}",
        f"system_prompt:     {templates.system_prompt!r}",
        f"default system:    {templates.default_system_block!r} "
        f"({'kept' if templates.keep_default_system_prompt else 'removed'})",
        f"template kwargs:   {json.dumps(templates.chat_template_kwargs, ensure_ascii=False)}",
    ]
    if templates.reasoning is not None:
        r = templates.reasoning
        opened = "opened by the generation prompt" if r.opened_by_generation_prompt else "not opened by the generation prompt"
        lines.append(f"reasoning:         {r.open!r} ... {r.close!r} ({opened})")
    if templates.source == "derived" or getattr(tokenizer, "chat_template", None):
        lines.append(f"response_prompt:   {templates.response_prompt(sample)!r}  (for {sample})")
    print("\n".join(lines))
    return 0
