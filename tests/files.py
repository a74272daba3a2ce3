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


def slow_pdf(lines: int = 20000) -> bytes:
    """A small, valid PDF whose one page holds `lines` long text operators: pypdf's text
    extraction spends minutes on it (quadratic in the page's text)."""
    content = b"BT /F1 12 Tf 72 700 Td " + (b"(" + b"A" * 1000 + b") Tj T* ") * lines + b"ET"
    return _one_page_pdf(content, b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")


def surrogate_pdf() -> bytes:
    """A valid PDF whose font's character map turns its text into "Ab" and a lone
    surrogate, which pypdf hands on as it is (it decodes character maps with surrogatepass)."""
    cmap = (
        b"/CIDInit /ProcSet findresource begin 12 dict begin begincmap\n"
        b"/CMapName /Bad def /CMapType 2 def\n"
        b"1 begincodespacerange <00> <FF> endcodespacerange\n"
        b"3 beginbfchar <01> <0041> <02> <0062> <03> <D800> endbfchar\n"
        b"endcmap CMapName currentdict /CMap defineresource pop end end"
    )
    return _one_page_pdf(
        b"BT /F1 12 Tf 72 700 Td <010203> Tj ET",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /ToUnicode 6 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(cmap) + cmap + b"\nendstream",
    )


def _one_page_pdf(content: bytes, font: bytes, *more: bytes) -> bytes:
    """A PDF written object by object: one page showing `content` in `font` (object 5);
    `more` are objects 6 and on."""
    import zlib

    stream = zlib.compress(content, 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
        font,
        *more,
    ]
    out = io.BytesIO(b"%PDF-1.4\n")
    out.seek(0, io.SEEK_END)
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return out.getvalue()
