"""Small real documents in each supported format."""

from __future__ import annotations

import io

from reportlab.pdfgen import canvas


def pdf_bytes(lines: list[str], title: str | None = None) -> bytes:
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    if title:
        pdf.setTitle(title)
    y = 800
    for line in lines:
        pdf.drawString(72, y, line)
        y -= 16
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()


HTML = b"""<!doctype html><html><head><title>Pager Rotation</title>
<style>body { color: red }</style><script>var secret = 1;</script></head>
<body><h1>Pager rotation</h1><p>The on-call engineer carries the pager for seven days.</p>
<p>Handover happens every Monday at 10:00 with a written summary.</p></body></html>"""

MARKDOWN = b"""# Coffee Machine Care

Descale the coffee machine every two weeks with citric acid.
Empty the drip tray daily so it never overflows.
"""
