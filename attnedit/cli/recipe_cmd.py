"""``attnedit recipe``: explain the recipe fields, or print a recipe fully resolved (validating it)."""

from __future__ import annotations

from .common import add_set, parse_sets


def add_parser(sub) -> None:
    p = sub.add_parser(
        "recipe",
        help="list every recipe field (--explain) or print a recipe fully resolved",
        description="With --explain: every recipe field, its default and what it does. With a recipe file: "
        "the recipe after --set overrides and validation, every field explicit. With neither: the default "
        "recipe, commented, to copy and edit (attnedit recipe > my.yaml).",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML to validate and print resolved")
    add_set(p, "override a field, e.g. stage2.steps=2000 or eval.ppl_context=2048,8192")
    p.add_argument("--explain", action="store_true", help="list every field with its default and help")
    p.add_argument("--no-comments", action="store_true", help="print the YAML without help comments")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..recipe import explain, load_recipe, parse_recipe, to_yaml

    if args.explain:
        print(explain())
        return 0
    sets = parse_sets(args.set)
    recipe = load_recipe(args.recipe, sets) if args.recipe else parse_recipe({}, sets)
    header = f"resolved from {args.recipe}" if args.recipe else "attnedit recipe: the defaults; copy, edit, then: attnedit convert my.yaml"
    print(to_yaml(recipe, header, comments=not args.no_comments), end="")
    return 0
