# cython: language_level=3
# Trace and span ids as lowercase hex, as format(id, "032x") / format(id, "016x") write them,
# without the format machinery: every exported span and every access line writes two or
# three. Shared by the compiled telemetry modules (cimport).

from cpython.long cimport PyLong_AsUnsignedLongLongMask

cdef inline void _write_hex(char *out, unsigned long long value, int digits) noexcept:
    cdef const char *alphabet = b"0123456789abcdef"
    cdef int i
    for i in range(digits - 1, -1, -1):
        out[i] = alphabet[value & 15]
        value >>= 4


cdef inline str hex64(object value):
    cdef char text[16]
    _write_hex(text, PyLong_AsUnsignedLongLongMask(value), 16)
    return text[:16].decode("ascii")


cdef inline str hex128(object value):
    cdef char text[32]
    _write_hex(text, PyLong_AsUnsignedLongLongMask(value >> 64), 16)
    _write_hex(text + 16, PyLong_AsUnsignedLongLongMask(value), 16)
    return text[:32].decode("ascii")
