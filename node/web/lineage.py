"""A model's version lineage as an SVG picture, drawn on the server (no script, no library)."""

from __future__ import annotations

from html import escape

BOX_W, BOX_H, GAP_X, GAP_Y = 220, 46, 60, 16


def lineage_svg(generations: list[list[dict[str, str]]], current: str) -> str:
    """Generations left to right (oldest first), each a column of boxes; arrows parent -> child.

    ``generations`` is :func:`node.web.queries.lineage`'s output; ``current`` is highlighted.
    Every box links to its model's page.
    """
    if not generations:
        return ""
    tallest = max(len(g) for g in generations)
    width = len(generations) * (BOX_W + GAP_X) - GAP_X + 2
    height = tallest * (BOX_H + GAP_Y) - GAP_Y + 2
    where: dict[str, tuple[int, int]] = {}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="version lineage">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>']
    boxes = []
    for gi, gen in enumerate(generations):
        x = 1 + gi * (BOX_W + GAP_X)
        for mi, m in enumerate(gen):
            y = 1 + mi * (BOX_H + GAP_Y)
            where[m["uid"]] = (x, y)
            cls = "box current" if m["uid"] == current else ("box missing" if not m["version"] else "box")
            label = escape(f'{m["name"]} {m["version"]}'.strip())
            uid = escape(m["uid"])
            box = (f'<rect class="{cls}" x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6"/>'
                   f'<text x="{x + 10}" y="{y + 19}" class="name">{label}</text>'
                   f'<text x="{x + 10}" y="{y + 36}" class="uid">{escape(m["uid"][-30:])}</text>')
            boxes.append(box if not m["version"] else f'<a href="/models/{uid}">{box}</a>')
    for gen in generations:
        for m in gen:
            if m["parent"] in where and m["uid"] in where:
                (px, py), (cx, cy) = where[m["parent"]], where[m["uid"]]
                parts.append(f'<path d="M{px + BOX_W},{py + BOX_H // 2} C{px + BOX_W + GAP_X // 2},{py + BOX_H // 2} '
                             f'{cx - GAP_X // 2},{cy + BOX_H // 2} {cx - 2},{cy + BOX_H // 2}" class="edge" '
                             'marker-end="url(#arrow)"/>')
    parts.extend(boxes)
    parts.append("</svg>")
    return "".join(parts)
