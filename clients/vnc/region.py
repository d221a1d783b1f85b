"""A viewer's dirty region: damage rectangles merged into a short list, clipped when taken.

Memory is bounded whatever the damage rate: past ``max_rects`` rectangles the region collapses to their
bounding box, and rectangles covered by another are dropped as they come.
"""

from __future__ import annotations

Rect = tuple[int, int, int, int]
"""(x, y, width, height)"""

MAX_RECTS = 16


def intersect(a: Rect, b: Rect) -> Rect | None:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def bounding(a: Rect, b: Rect) -> Rect:
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return x0, y0, x1 - x0, y1 - y0


def contains(outer: Rect, inner: Rect) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def _touch_or_overlap(a: Rect, b: Rect) -> bool:
    return not (a[0] + a[2] < b[0] or b[0] + b[2] < a[0] or a[1] + a[3] < b[1] or b[1] + b[3] < a[1])


def _area(r: Rect) -> int:
    return r[2] * r[3]


class DirtyRegion:
    def __init__(self, max_rects: int = MAX_RECTS) -> None:
        self.max_rects = max_rects
        self.rects: list[Rect] = []

    def __bool__(self) -> bool:
        return bool(self.rects)

    def clear(self) -> None:
        self.rects.clear()

    def add(self, x: int, y: int, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            return
        new: Rect = (x, y, width, height)
        # Merge with overlapping or touching rectangles while the bounding box wastes little area.
        changed = True
        while changed:
            changed = False
            for i, old in enumerate(self.rects):
                if contains(old, new):
                    return
                if contains(new, old):
                    del self.rects[i]
                    changed = True
                    break
                if _touch_or_overlap(old, new):
                    merged = bounding(old, new)
                    if _area(merged) <= (_area(old) + _area(new)) * 3 // 2:
                        del self.rects[i]
                        new = merged
                        changed = True
                        break
        self.rects.append(new)
        if len(self.rects) > self.max_rects:
            box = self.rects[0]
            for r in self.rects[1:]:
                box = bounding(box, r)
            self.rects = [box]

    def take(self, clip: Rect) -> list[Rect]:
        """The region's rectangles inside ``clip``; those parts leave the region, the rest stays."""
        taken: list[Rect] = []
        rest: list[Rect] = []
        for r in self.rects:
            part = intersect(r, clip)
            if part is None:
                rest.append(r)
                continue
            taken.append(part)
            if part != r:  # keep what lies outside the clip (up to 4 bands)
                x0, y0, x1, y1 = r[0], r[1], r[0] + r[2], r[1] + r[3]
                px0, py0, px1, py1 = part[0], part[1], part[0] + part[2], part[1] + part[3]
                bands = [(x0, y0, r[2], py0 - y0), (x0, py1, r[2], y1 - py1),
                         (x0, py0, px0 - x0, py1 - py0), (px1, py0, x1 - px1, py1 - py0)]
                rest.extend(b for b in bands if b[2] > 0 and b[3] > 0)
        self.rects = []
        for r in rest:
            self.add(*r)
        return taken
