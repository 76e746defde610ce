/* The build's native staging pass for well-formed log lines (see stage.py, `_stage_native`).

   `stage_line(..., raw)` reads one log line and, when it is a valid
   conversation or comparison in the common shape, returns everything the
   staging pass makes of it: its index entry, and for a record with a signal
   the curated rows, encoded as they will be written. It is the same work as

       wire.decode / records.py  ->  rules.curate_*  ->  stage.stage_rows

   done in one C pass, because that Python chain is most of a build's time.
   Those modules are the definition: this file follows them line by line
   (rules.curate_conversation is mirrored in `curate_conversation` below),
   and tests/test_data_native.py holds every result to theirs.

   On *any* doubt it returns None and the caller reads the line on the Python
   path, which decides and words every reason: invalid UTF-8 or JSON, a
   number where a string belongs, an integer of more than 640 digits, a
   duplicate or escaped key, a lone surrogate, a `feedback` record, more than
   MAX_MESSAGES messages, nesting deeper than MAX_DEPTH, a message that split-out
   feedback would give a second signal. So what a line becomes never depends on this file
   being built (setup.py builds it as optional; without it, the Python path
   does everything).

   PII (rule 8) stays in Python: a text with an ASCII digit or `@` (every PII
   kind needs one) is passed to `scrub(text) -> (clean, (e, p, c, i) | None)`,
   pii.scrub; the others are returned as they are, as pii.scrub does. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 64
#define MAX_MESSAGES 512
#define KEEP_AT_MOST 16384  /* scratch kept from line to line: nodes, texts (x 64 bytes of row) */

/* ---------------------------------------------------------------- buffers -- */

typedef struct {
    char *p;
    Py_ssize_t n, cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t extra) {
    if (b->n + extra <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1024;
    while (cap < b->n + extra) cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const char *s, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

static int buf_puts(Buf *b, const char *s) { return buf_put(b, s, (Py_ssize_t)strlen(s)); }

/* Room in the array `*items` (of `*cap` items of `size` bytes) for item number `n`: doubled when
   full, starting at `first`. */
static int grow(void **items, int *cap, int n, size_t size, int first) {
    if (n < *cap) return 0;
    int new_cap = *cap ? *cap * 2 : first;
    void *p = PyMem_Realloc(*items, size * new_cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    *items = p;
    *cap = new_cap;
    return 0;
}

/* A block allocator for one call: pointers stay valid until `arena_free`. */
typedef struct Block { struct Block *next; char data[]; } Block;
typedef struct { Block *head; char *at; Py_ssize_t left; } Arena;

static void *arena_alloc(Arena *a, Py_ssize_t n) {
    n = (n + 7) & ~(Py_ssize_t)7;
    if (n > a->left) {
        Py_ssize_t size = n > 65536 ? n : 65536;
        Block *b = PyMem_Malloc(sizeof(Block) + size);
        if (!b) { PyErr_NoMemory(); return NULL; }
        b->next = a->head;
        a->head = b;
        a->at = b->data;
        a->left = size;
    }
    void *p = a->at;
    a->at += n;
    a->left -= n;
    return p;
}

/* The first 256 KiB of every call: most lines need no more, and no malloc then. */
static uint64_t arena0[1 << 15];

static void arena_init(Arena *a) {
    a->head = NULL;
    a->at = (char *)arena0;
    a->left = sizeof arena0;
}

static void arena_free(Arena *a) {
    while (a->head) {
        Block *next = a->head->next;
        PyMem_Free(a->head);
        a->head = next;
    }
}

/* Eight bytes at a time: does `x` hold a byte equal to `b` / below `b` (b <= 0x80)? */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
#define HAS_ZERO(x) (((x) - ONES) & ~(x) & HIGHS)
#define HAS_BYTE(x, b) HAS_ZERO((x) ^ (ONES * (b)))
#define HAS_LESS(x, b) (((x) - ONES * (b)) & ~(x) & HIGHS)

static uint64_t load8(const char *p) { uint64_t x; memcpy(&x, p, 8); return x; }

/* The high bit of each byte of `x` that equals `b`, exactly (no carries between bytes). */
static uint64_t eq_mask(uint64_t x, unsigned char b) {
    const uint64_t lows = 0x7F7F7F7F7F7F7F7FULL;
    uint64_t y = x ^ (ONES * b);
    return ~(((y & lows) + lows) | y | lows);
}

/* Bytes of s[0:n] before the first '"', '\\' or control byte (n if none). */
static Py_ssize_t plain_run(const char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x = load8(s + i);
        if (HAS_BYTE(x, '"') | HAS_BYTE(x, '\\') | HAS_LESS(x, 0x20)) break;
    }
    while (i < n && s[i] != '"' && s[i] != '\\' && (unsigned char)s[i] >= 0x20) i++;
    return i;
}

/* ---------------------------------------------------------------- blake2b -- */

/* BLAKE2b (RFC 7693), unkeyed, as hashlib.blake2b(data, digest_size=n): the dedup keys
   (rules.key_digest) and the split draw (rules.split_of). */
typedef struct { uint8_t b[128]; uint64_t h[8]; uint64_t t; size_t c; size_t outlen; } B2b;

static const uint64_t B2B_IV[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL};

static const uint8_t B2B_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

#define ROTR64(x, y) (((x) >> (y)) ^ ((x) << (64 - (y))))
#define B2B_G(a, b, c, d, x, y) {                                   \
        v[a] = v[a] + v[b] + x; v[d] = ROTR64(v[d] ^ v[a], 32);     \
        v[c] = v[c] + v[d];     v[b] = ROTR64(v[b] ^ v[c], 24);     \
        v[a] = v[a] + v[b] + y; v[d] = ROTR64(v[d] ^ v[a], 16);     \
        v[c] = v[c] + v[d];     v[b] = ROTR64(v[b] ^ v[c], 63); }

static void b2b_compress(B2b *ctx, int last) {
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) { v[i] = ctx->h[i]; v[i + 8] = B2B_IV[i]; }
    v[12] ^= ctx->t;  /* (the high word of the counter stays 0: no record is 2^64 bytes) */
    if (last) v[14] = ~v[14];
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(m, ctx->b, 128);  /* the words are little-endian: as they lie on x86-64 and arm64 */
#else
    for (int i = 0; i < 16; i++) {
        const uint8_t *q = &ctx->b[8 * i];
        m[i] = (uint64_t)q[0] | ((uint64_t)q[1] << 8) | ((uint64_t)q[2] << 16) | ((uint64_t)q[3] << 24)
               | ((uint64_t)q[4] << 32) | ((uint64_t)q[5] << 40) | ((uint64_t)q[6] << 48) | ((uint64_t)q[7] << 56);
    }
#endif
    for (int i = 0; i < 12; i++) {
        const uint8_t *sg = B2B_SIGMA[i];
        B2B_G(0, 4, 8, 12, m[sg[0]], m[sg[1]]);
        B2B_G(1, 5, 9, 13, m[sg[2]], m[sg[3]]);
        B2B_G(2, 6, 10, 14, m[sg[4]], m[sg[5]]);
        B2B_G(3, 7, 11, 15, m[sg[6]], m[sg[7]]);
        B2B_G(0, 5, 10, 15, m[sg[8]], m[sg[9]]);
        B2B_G(1, 6, 11, 12, m[sg[10]], m[sg[11]]);
        B2B_G(2, 7, 8, 13, m[sg[12]], m[sg[13]]);
        B2B_G(3, 4, 9, 14, m[sg[14]], m[sg[15]]);
    }
    for (int i = 0; i < 8; i++) ctx->h[i] ^= v[i] ^ v[i + 8];
}

static void b2b_init(B2b *ctx, size_t outlen) {
    for (int i = 0; i < 8; i++) ctx->h[i] = B2B_IV[i];
    ctx->h[0] ^= 0x01010000ULL ^ outlen;
    ctx->t = 0;
    ctx->c = 0;
    ctx->outlen = outlen;
}

static void b2b_update(B2b *ctx, const void *in, size_t n) {
    const uint8_t *p = in;
    while (n) {
        if (ctx->c == 128) {  /* a full block is compressed only once more input follows it */
            ctx->t += 128;
            b2b_compress(ctx, 0);
            ctx->c = 0;
        }
        size_t take = 128 - ctx->c < n ? 128 - ctx->c : n;
        memcpy(ctx->b + ctx->c, p, take);
        ctx->c += take;
        p += take;
        n -= take;
    }
}

static void b2b_final(B2b *ctx, uint8_t *out) {
    ctx->t += ctx->c;
    memset(ctx->b + ctx->c, 0, 128 - ctx->c);
    b2b_compress(ctx, 1);
    for (size_t i = 0; i < ctx->outlen; i++) out[i] = (uint8_t)(ctx->h[i >> 3] >> (8 * (i & 7)));
}

/* ------------------------------------------------------------------- JSON -- */

typedef struct { const char *p; Py_ssize_t n; } Str; /* UTF-8, unescaped */

enum { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct {
    int type;
    Str s;        /* J_STR: the text; J_NUM: the token as written */
    Str key;      /* member of an object: its key */
    int first;    /* J_ARR / J_OBJ: first child, or -1 */
    int next;     /* next sibling, or -1 */
    int count;    /* J_ARR / J_OBJ: children */
} Node;

typedef struct {
    const char *at, *end;
    Node *nodes;
    int n, cap;
    Arena *arena;
    int bail;     /* 1: leave the line to the Python path */
} Parser;

static int new_node(Parser *ps, int type) {
    if (grow((void **)&ps->nodes, &ps->cap, ps->n, sizeof(Node), 256) < 0) return -1;
    Node *nd = &ps->nodes[ps->n];
    nd->type = type;
    nd->s.p = NULL; nd->s.n = 0;
    nd->key.p = NULL; nd->key.n = 0;
    nd->first = nd->next = -1;
    nd->count = 0;
    return ps->n++;
}

static void skip_ws(Parser *ps) {
    while (ps->at < ps->end && (*ps->at == ' ' || *ps->at == '\t' || *ps->at == '\n' || *ps->at == '\r'))
        ps->at++;
}

static int hex4(const char *p, unsigned *out) {
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p[k];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    *out = v;
    return 0;
}

/* A string at ps->at (just after its opening quote). The line is valid UTF-8 (checked first);
   escapes are decoded into the arena, a lone surrogate bails. `escaped` tells whether it had any. */
static int parse_string(Parser *ps, Str *out, int *escaped) {
    const char *start = ps->at, *p = start + plain_run(start, ps->end - start);
    if (p < ps->end && *p == '"') {
        out->p = start;
        out->n = p - start;
        ps->at = p + 1;
        if (escaped) *escaped = 0;
        return 0;
    }
    /* Escapes (or a control character, or the end): find the closing quote, then decode from the
       start into as many bytes as the string has (decoded, it is never longer). */
    while (p < ps->end && *p != '"') {
        if ((unsigned char)*p < 0x20) { ps->bail = 1; return 0; }
        p += *p == '\\' ? 2 : 1;  /* (the byte after a backslash never closes the string) */
        if (p < ps->end) p += plain_run(p, ps->end - p);
    }
    if (p >= ps->end) { ps->bail = 1; return 0; }
    char *dst = arena_alloc(ps->arena, p - start);
    if (!dst) return -1;
    char *d = dst;
    p = start;
    for (;;) {
        if (p >= ps->end) { ps->bail = 1; return 0; }
        unsigned char c = (unsigned char)*p;
        if (c == '"') break;
        if (c < 0x20) { ps->bail = 1; return 0; }
        if (c != '\\') {
            Py_ssize_t run = plain_run(p, ps->end - p);
            memcpy(d, p, run);
            d += run;
            p += run;
            continue;
        }
        if (p + 1 >= ps->end) { ps->bail = 1; return 0; }
        char e = p[1];
        p += 2;
        switch (e) {
        case '"': *d++ = '"'; break;
        case '\\': *d++ = '\\'; break;
        case '/': *d++ = '/'; break;
        case 'b': *d++ = '\b'; break;
        case 'f': *d++ = '\f'; break;
        case 'n': *d++ = '\n'; break;
        case 'r': *d++ = '\r'; break;
        case 't': *d++ = '\t'; break;
        case 'u': {
            unsigned u;
            if (p + 4 > ps->end || hex4(p, &u) < 0) { ps->bail = 1; return 0; }
            p += 4;
            if (u >= 0xDC00 && u <= 0xDFFF) { ps->bail = 1; return 0; } /* lone low surrogate */
            if (u >= 0xD800 && u <= 0xDBFF) {
                unsigned lo;
                if (p + 6 > ps->end || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo) < 0
                    || lo < 0xDC00 || lo > 0xDFFF) { ps->bail = 1; return 0; }
                p += 6;
                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (u < 0x80) *d++ = (char)u;
            else if (u < 0x800) { *d++ = (char)(0xC0 | (u >> 6)); *d++ = (char)(0x80 | (u & 0x3F)); }
            else if (u < 0x10000) {
                *d++ = (char)(0xE0 | (u >> 12)); *d++ = (char)(0x80 | ((u >> 6) & 0x3F));
                *d++ = (char)(0x80 | (u & 0x3F));
            } else {
                *d++ = (char)(0xF0 | (u >> 18)); *d++ = (char)(0x80 | ((u >> 12) & 0x3F));
                *d++ = (char)(0x80 | ((u >> 6) & 0x3F)); *d++ = (char)(0x80 | (u & 0x3F));
            }
            break;
        }
        default: ps->bail = 1; return 0;
        }
    }
    out->p = dst;
    out->n = d - dst;
    ps->at = p + 1;
    if (escaped) *escaped = 1;
    return 0;
}

/* A number, as JSON writes it (RFC 8259); the token is kept, never converted. */
static void parse_number(Parser *ps, Node *nd) {
    const char *p = ps->at, *start = p;
    if (p < ps->end && *p == '-') p++;
    if (p < ps->end && *p == '0') p++;
    else if (p < ps->end && *p >= '1' && *p <= '9') { while (p < ps->end && *p >= '0' && *p <= '9') p++; }
    else { ps->bail = 1; return; }
    /* Python refuses to read an integer of more digits than sys.get_int_max_str_digits() (4300 by
       default, 640 at the least): such a line is the Python path's to word. */
    if (p - start > 640) { ps->bail = 1; return; }
    if (p < ps->end && *p == '.') {
        p++;
        if (!(p < ps->end && *p >= '0' && *p <= '9')) { ps->bail = 1; return; }
        while (p < ps->end && *p >= '0' && *p <= '9') p++;
    }
    if (p < ps->end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < ps->end && (*p == '+' || *p == '-')) p++;
        if (!(p < ps->end && *p >= '0' && *p <= '9')) { ps->bail = 1; return; }
        while (p < ps->end && *p >= '0' && *p <= '9') p++;
    }
    nd->s.p = start;
    nd->s.n = p - start;
    ps->at = p;
}

static int parse_value(Parser *ps, int depth);

static int parse_container(Parser *ps, int idx, int depth, int object) {
    char close = object ? '}' : ']';
    int last = -1;
    skip_ws(ps);
    if (ps->at < ps->end && *ps->at == close) { ps->at++; return idx; }
    for (;;) {
        Str key = {NULL, 0};
        if (object) {
            skip_ws(ps);
            if (!(ps->at < ps->end && *ps->at == '"')) { ps->bail = 1; return idx; }
            ps->at++;
            int escaped;
            if (parse_string(ps, &key, &escaped) < 0) return -1;
            if (ps->bail) return idx;
            if (escaped) { ps->bail = 1; return idx; } /* "\u0069d" is "id": not worth the doubt */
            skip_ws(ps);
            if (!(ps->at < ps->end && *ps->at == ':')) { ps->bail = 1; return idx; }
            ps->at++;
        }
        int child = parse_value(ps, depth + 1);
        if (child < 0) return -1;
        if (ps->bail) return idx;
        ps->nodes[child].key = key;
        if (last < 0) ps->nodes[idx].first = child;
        else ps->nodes[last].next = child;
        last = child;
        ps->nodes[idx].count++;
        skip_ws(ps);
        if (ps->at >= ps->end) { ps->bail = 1; return idx; }
        if (*ps->at == ',') { ps->at++; continue; }
        if (*ps->at == close) { ps->at++; return idx; }
        ps->bail = 1;
        return idx;
    }
}

static int parse_value(Parser *ps, int depth) {
    if (depth > MAX_DEPTH) { ps->bail = 1; return 0; }
    skip_ws(ps);
    if (ps->at >= ps->end) { ps->bail = 1; return 0; }
    char c = *ps->at;
    int idx;
    switch (c) {
    case '{':
    case '[':
        idx = new_node(ps, c == '{' ? J_OBJ : J_ARR);
        if (idx < 0) return -1;
        ps->at++;
        return parse_container(ps, idx, depth, c == '{');
    case '"':
        idx = new_node(ps, J_STR);
        if (idx < 0) return -1;
        ps->at++;
        if (parse_string(ps, &ps->nodes[idx].s, NULL) < 0) return -1;
        return idx;
    case 't':
    case 'f':
    case 'n': {
        const char *word = c == 't' ? "true" : c == 'f' ? "false" : "null";
        Py_ssize_t len = (Py_ssize_t)strlen(word);
        if (ps->end - ps->at < len || memcmp(ps->at, word, len) != 0) { ps->bail = 1; return 0; }
        ps->at += len;
        return new_node(ps, c == 't' ? J_TRUE : c == 'f' ? J_FALSE : J_NULL);
    }
    default:
        idx = new_node(ps, J_NUM);
        if (idx < 0) return -1;
        parse_number(ps, &ps->nodes[idx]);
        return idx;
    }
}

/* Python's strict UTF-8 (no surrogates, no overlong forms, at most U+10FFFF). */
static int valid_utf8(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        if (i + 8 <= n && !(load8((const char *)s + i) & HIGHS)) { i += 8; continue; }
        unsigned char c = s[i];
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (i + 2 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return 0;
            if (c == 0xE0 && s[i + 1] < 0xA0) return 0;
            if (c == 0xED && s[i + 1] >= 0xA0) return 0;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (i + 3 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80
                || (s[i + 3] & 0xC0) != 0x80) return 0;
            if (c == 0xF0 && s[i + 1] < 0x90) return 0;
            if (c == 0xF4 && s[i + 1] >= 0x90) return 0;
            i += 4;
        } else return 0;
    }
    return 1;
}

/* ------------------------------------------------------- reading records -- */

static int str_eq(Str a, const char *lit) {
    Py_ssize_t n = (Py_ssize_t)strlen(lit);
    return a.n == n && memcmp(a.p, lit, n) == 0;
}

static int strs_eq(Str a, Str b) { return a.n == b.n && memcmp(a.p, b.p, a.n) == 0; }

/* The member `key` of object `obj` (-1 if absent or null, as dict.get reads null); a second
   member of that name bails (the Python decoders keep the last, a doubt not worth keeping). */
static int member(Parser *ps, int obj, const char *key) {
    int found = -1;
    for (int c = ps->nodes[obj].first; c >= 0; c = ps->nodes[c].next) {
        if (str_eq(ps->nodes[c].key, key)) {
            if (found >= 0) { ps->bail = 1; return -1; }
            found = c;
        }
    }
    if (found >= 0 && ps->nodes[found].type == J_NULL) return -1;
    return found;
}

/* An optional string member: 1 and its text if present, 0 if absent/null; bails on another type. */
static int opt_str(Parser *ps, int obj, const char *key, Str *out) {
    int c = member(ps, obj, key);
    if (c < 0) return 0;
    if (ps->nodes[c].type != J_STR) { ps->bail = 1; return 0; }
    *out = ps->nodes[c].s;
    return 1;
}

enum { R_SYSTEM, R_USER, R_ASSISTANT, R_TOOL };
static const char *ROLE_NAMES[] = {"system", "user", "assistant", "tool"};

static int role_of(Parser *ps, int obj) {
    int c = member(ps, obj, "role");
    if (c < 0 || ps->nodes[c].type != J_STR) { ps->bail = 1; return -1; }
    for (int r = 0; r < 4; r++)
        if (str_eq(ps->nodes[c].s, ROLE_NAMES[r])) return r;
    ps->bail = 1;
    return -1;
}

/* A required, non-empty string member (records.required_str). */
static int req_str(Parser *ps, int obj, const char *key, Str *out) {
    if (!opt_str(ps, obj, key, out) || out->n == 0) { ps->bail = 1; return 0; }
    return 1;
}

/* The common optional fields (records._check_common): persona, timestamp, metadata. */
static void check_common(Parser *ps, int obj, Str *persona, int *has_persona) {
    Str ts;
    *has_persona = opt_str(ps, obj, "persona", persona);
    opt_str(ps, obj, "timestamp", &ts);
    int md = member(ps, obj, "metadata");
    if (md >= 0 && ps->nodes[md].type != J_OBJ) ps->bail = 1;
}

/* --------------------------------------------------------------- texts -- */

/* A text of the record's rows: its scrubbed form (rule 8), the whitespace-normalised scrubbed form
   (the dedup key part, rule 7) and its PII by kind. Worked out once, when first needed. */
typedef struct {
    Str raw;
    int done;
    Str clean;
    Str key;
    long pii[4];
    int has_pii;
} Text;

typedef struct {
    Text *items;
    int n, cap;
} Texts;

static int add_text(Texts *t, Str raw) {
    if (grow((void **)&t->items, &t->cap, t->n, sizeof(Text), 64) < 0) return -1;
    Text *x = &t->items[t->n];
    memset(x, 0, sizeof(Text));
    x->raw = raw;
    return t->n++;
}

/* Code point at s[*i] (valid UTF-8), advancing *i. */
static unsigned next_cp(const unsigned char *s, Py_ssize_t *i) {
    unsigned char c = s[*i];
    if (c < 0x80) { (*i)++; return c; }
    if (c < 0xE0) { unsigned u = ((c & 0x1F) << 6) | (s[*i + 1] & 0x3F); *i += 2; return u; }
    if (c < 0xF0) {
        unsigned u = ((c & 0x0F) << 12) | ((s[*i + 1] & 0x3F) << 6) | (s[*i + 2] & 0x3F);
        *i += 3;
        return u;
    }
    unsigned u = ((c & 0x07) << 18) | ((s[*i + 1] & 0x3F) << 12) | ((s[*i + 2] & 0x3F) << 6) | (s[*i + 3] & 0x3F);
    *i += 4;
    return u;
}

/* str.isspace(): what str.split() splits on. */
static int is_space(unsigned u) {
    if (u <= 0x20) return u == 0x20 || (u >= 0x09 && u <= 0x0D) || (u >= 0x1C && u <= 0x1F);
    if (u < 0x85) return 0;
    return u == 0x85 || u == 0xA0 || u == 0x1680 || (u >= 0x2000 && u <= 0x200A) || u == 0x2028
           || u == 0x2029 || u == 0x202F || u == 0x205F || u == 0x3000;
}

/* ASCII text that is already normal: no whitespace but single inner spaces (rules.ASCII_BREAKS). */
static int is_normal_ascii(Str text) {
    const unsigned char *s = (const unsigned char *)text.p;
    if (text.n && (s[0] == ' ' || s[text.n - 1] == ' ')) return 0;
    Py_ssize_t i = 0;
    int space_before = 0;  /* the byte before `i` is a space */
    for (; i + 8 <= text.n; i += 8) {  /* no byte >= 0x80, below 0x20 or a double space */
        uint64_t x = load8(text.p + i);
        if ((x & HIGHS) | HAS_LESS(x, 0x20)) return 0;
        uint64_t sp = eq_mask(x, ' ');
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        if ((sp & (sp << 8)) || (space_before && (sp & 0x80))) return 0;
        space_before = (int)(sp >> 63);
#else
        if ((sp & (sp >> 8)) || (space_before && (sp >> 63))) return 0;
        space_before = (int)(sp & 0x80);
#endif
    }
    for (; i < text.n; i++) {
        if (s[i] >= 0x80 || s[i] < 0x20 || (s[i] == ' ' && space_before)) return 0;
        space_before = s[i] == ' ';
    }
    return 1;
}

/* rules.normalize_whitespace: " ".join(text.split()), into the arena (or `text` itself). */
static int normalize(Arena *a, Str text, Str *out) {
    if (is_normal_ascii(text)) { *out = text; return 0; }
    const unsigned char *s = (const unsigned char *)text.p;
    char *dst = arena_alloc(a, text.n + 1);
    if (!dst) return -1;
    Py_ssize_t i = 0, n = 0;
    int pending = 0; /* a space to write before the next word */
    while (i < text.n) {
        Py_ssize_t at = i;
        unsigned u = next_cp(s, &i);
        if (is_space(u)) { pending = n > 0; continue; }
        if (pending) { dst[n++] = ' '; pending = 0; }
        memcpy(dst + n, s + at, i - at);
        n += i - at;
    }
    out->p = dst;
    out->n = n;
    return 0;
}

typedef struct {
    Arena arena;
    Parser ps;
    Texts texts;
    PyObject *scrub;  /* pii.scrub, wrapped: text -> (clean, counts | None) */
    PyObject *keep;   /* the scrubbed str objects whose UTF-8 the texts point into */
    int merge;
} Ctx;

/* Does the text hold an ASCII digit or `@` (what pii.scrub's first check looks for)? Eight bytes
   at a time, exactly: in 7-bit lanes (no carry crosses a byte), y + 0x50 sets bit 7 from '0' up,
   y + 0x46 from ':' up; bytes >= 0x80 (not ASCII) are masked out by ~x. */
static int needs_scrub(Str t) {
    const uint64_t lows = 0x7F7F7F7F7F7F7F7FULL;
    Py_ssize_t i = 0;
    for (; i + 8 <= t.n; i += 8) {
        uint64_t x = load8(t.p + i), y = x & lows;
        uint64_t digits = (y + ONES * 0x50) & ~(y + ONES * 0x46) & ~x & HIGHS;
        if (digits | eq_mask(x, '@')) return 1;
    }
    for (; i < t.n; i++)
        if ((t.p[i] >= '0' && t.p[i] <= '9') || t.p[i] == '@') return 1;
    return 0;
}

static Text *text_at(Ctx *cx, int id) {
    Text *x = &cx->texts.items[id];
    if (x->done) return x;
    x->clean = x->raw;
    if (needs_scrub(x->raw)) {
        PyObject *arg = PyUnicode_DecodeUTF8(x->raw.p, x->raw.n, "strict");
        if (!arg) return NULL;
        PyObject *res = PyObject_CallOneArg(cx->scrub, arg);
        Py_DECREF(arg);
        if (!res) return NULL;
        x = &cx->texts.items[id]; /* (the table does not move during the call, but read it again) */
        if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(res, 0))) {
            Py_DECREF(res);
            PyErr_SetString(PyExc_TypeError, "scrub must return (str, tuple | None)");
            return NULL;
        }
        PyObject *clean = PyTuple_GET_ITEM(res, 0), *counts = PyTuple_GET_ITEM(res, 1);
        if (PyList_Append(cx->keep, clean) < 0) { Py_DECREF(res); return NULL; }
        Py_ssize_t n;
        const char *p = PyUnicode_AsUTF8AndSize(clean, &n);
        if (!p) { Py_DECREF(res); return NULL; }
        x->clean.p = p;
        x->clean.n = n;
        if (counts != Py_None) {
            if (!PyTuple_Check(counts) || PyTuple_GET_SIZE(counts) != 4) {
                Py_DECREF(res);
                PyErr_SetString(PyExc_TypeError, "scrub must return 4 counts");
                return NULL;
            }
            for (int k = 0; k < 4; k++) {
                x->pii[k] = PyLong_AsLong(PyTuple_GET_ITEM(counts, k));
                if (x->pii[k] == -1 && PyErr_Occurred()) { Py_DECREF(res); return NULL; }
                if (x->pii[k]) x->has_pii = 1;
            }
        }
        Py_DECREF(res);
    }
    if (normalize(&cx->arena, x->clean, &x->key) < 0) return NULL;
    x->done = 1;
    return x;
}

/* ---------------------------------------------------------------- rows -- */

/* A prompt: (role, text) per message. */
typedef struct {
    int n;
    int *role;
    int *text;
    int hashed;      /* `state` holds the hash of its key part (rules.messages_key_text) */
    B2b state;
} Prompt;

typedef struct {
    Str id;
    int role;
    int text;        /* content */
    int has_fb;
    int rating;      /* -1 none, 0 down, 1 up */
    int edit;        /* text of edited_content, or -1 */
    int comment;     /* text of a non-empty comment, or -1 */
    int corrects;    /* index of the message this one corrects, or -1 */
    int corrected;   /* some later message corrects this one */
} Msg;

static const char *OUTPUT_NAMES[] = {"sft", "dpo", "kto"};
enum { O_SFT, O_DPO, O_KTO };

/* An ordered tally (insertion order, as the dicts of rules.Curated). */
typedef struct { const char *name[8]; long count[8]; int n; } Tally;

static void tally_add(Tally *t, const char *name) {
    for (int k = 0; k < t->n; k++)
        if (strcmp(t->name[k], name) == 0) { t->count[k]++; return; }
    t->name[t->n] = name;
    t->count[t->n++] = 1;
}

/* JSON string as orjson writes it: UTF-8 as is; ", \ and controls escaped (\u00xx lowercase). */
static int put_json_str(Buf *b, Str s) {
    static const char hexd[] = "0123456789abcdef";
    if (buf_reserve(b, s.n * 6 + 2) < 0) return -1;
    char *d = b->p + b->n;
    *d++ = '"';
    for (Py_ssize_t i = 0; i < s.n; i++) {
        Py_ssize_t run = plain_run(s.p + i, s.n - i);
        if (run) {
            memcpy(d, s.p + i, run);
            d += run;
            i += run;
            if (i == s.n) break;
        }
        unsigned char c = (unsigned char)s.p[i];
        *d++ = '\\';
        switch (c) {
        case '"': *d++ = '"'; break;
        case '\\': *d++ = '\\'; break;
        case '\b': *d++ = 'b'; break;
        case '\f': *d++ = 'f'; break;
        case '\n': *d++ = 'n'; break;
        case '\r': *d++ = 'r'; break;
        case '\t': *d++ = 't'; break;
        default:
            *d++ = 'u'; *d++ = '0'; *d++ = '0';
            *d++ = hexd[c >> 4]; *d++ = hexd[c & 15];
        }
    }
    *d++ = '"';
    b->n = d - b->p;
    return 0;
}

typedef struct {
    Ctx *cx;
    Msg *msgs;
    int nmsgs;
    Str record_id;      /* conversation_id or comparison_id */
    int comparison;
    Str persona;
    int has_persona;
    Tally signals, drops;
    long same_answers;  /* DPO pairs dropped by stage_rows: counted after the curation's drops, as there */
    const char *split;  /* rule 9: "train" or "eval" */
    Buf persona_json;   /* the persona as the staging index writes it (json.encoder.encode_basestring_ascii) */
    PyObject *rows;     /* [(output, index fields, row JSON)] */
    Buf *row, *fields;
    Prompt cmp_prompt;  /* a comparison, as read: its prompt, which response is chosen (-1: a tie), */
    int cmp_chosen;     /* and the ids and texts of the chosen and the rejected */
    Str cmp_ids[2];
    int cmp_texts[2];
} Rows;

static int put_message(Buf *b, int role, Text *t) {
    if (buf_puts(b, "{\"role\":\"") < 0 || buf_put(b, ROLE_NAMES[role], strlen(ROLE_NAMES[role])) < 0
        || buf_puts(b, "\",\"content\":") < 0 || put_json_str(b, t->clean) < 0 || buf_puts(b, "}") < 0) return -1;
    return 0;
}

static PyObject *output_names[3];  /* "sft", "dpo", "kto" as str (made once, in PyInit__native) */

/* A non-negative integer in decimal. */
static int put_int(Buf *b, long long v) {
    char digits[24];
    int n = 0;
    do { digits[sizeof digits - 1 - n++] = (char)('0' + v % 10); v /= 10; } while (v > 0);
    return buf_put(b, digits + sizeof digits - n, n);
}

static void add_pii(long *sum, Text *t) {
    if (t->has_pii)
        for (int k = 0; k < 4; k++) sum[k] += t->pii[k];
}

static void hash_piece(B2b *h, int role, Text *t) {
    b2b_update(h, ROLE_NAMES[role], strlen(ROLE_NAMES[role]));
    b2b_update(h, "\x1f", 1);
    b2b_update(h, t->key.p, t->key.n);
}

/* One row (stage.stage_rows): scrubbed, encoded, keyed, with its line of the staging index.
   `ids`: the source's message indexes (a comparison's, chosen and rejected, are `cmp_ids`).
   Returns 1 if made, 0 if dropped (a DPO pair whose scrubbed answers are the same), -1 on error. */
static int make_row(Rows *r, int output, const char *rule, Prompt *prompt, int answer, int rejected, int label,
                    int *ids, int nids, Str *cmp_ids) {
    static const char hexd[] = "0123456789abcdef";
    Ctx *cx = r->cx;
    Text *a, *rej = NULL;
    for (int k = 0; k < prompt->n; k++)  /* every text worked out first: the table is not read again */
        if (!text_at(cx, prompt->text[k])) return -1;
    if (!text_at(cx, answer) || (output == O_DPO && !text_at(cx, rejected))) return -1;
    a = &cx->texts.items[answer];
    if (output == O_DPO) {
        rej = &cx->texts.items[rejected];
        if (strs_eq(a->key, rej->key)) { r->same_answers++; return 0; }  /* rules.chosen_equals_rejected */
    }
    /* The dedup key (rules.dedup_key): blake2b of the parts' key texts joined by \x1d; the
       prompt's part is hashed once for all the rows of its message. */
    if (!prompt->hashed) {
        b2b_init(&prompt->state, 16);
        for (int k = 0; k < prompt->n; k++) {
            if (k) b2b_update(&prompt->state, "\x1e", 1);
            hash_piece(&prompt->state, prompt->role[k], &cx->texts.items[prompt->text[k]]);
        }
        prompt->hashed = 1;
    }
    B2b h = prompt->state;
    b2b_update(&h, "\x1d", 1);
    hash_piece(&h, R_ASSISTANT, a);
    if (output == O_DPO) { b2b_update(&h, "\x1d", 1); hash_piece(&h, R_ASSISTANT, rej); }
    if (output == O_KTO) b2b_update(&h, label ? "\x1d" "1" : "\x1d" "0", 2);
    uint8_t digest[16];
    b2b_final(&h, digest);

    long pii[4] = {0, 0, 0, 0};
    Buf *row = r->row;
    row->n = 0;
    if (buf_puts(row, "{\"prompt\":[") < 0) return -1;
    for (int k = 0; k < prompt->n; k++) {
        Text *t = &cx->texts.items[prompt->text[k]];
        if ((k && buf_puts(row, ",") < 0) || put_message(row, prompt->role[k], t) < 0) return -1;
        add_pii(pii, t);
    }
    if (buf_puts(row, output == O_DPO ? "],\"chosen\":[" : "],\"completion\":[") < 0
        || put_message(row, R_ASSISTANT, a) < 0) return -1;
    add_pii(pii, a);
    if (output == O_DPO) {
        if (buf_puts(row, "],\"rejected\":[") < 0 || put_message(row, R_ASSISTANT, rej) < 0) return -1;
        add_pii(pii, rej);
    }
    if (buf_puts(row, "]") < 0) return -1;
    if (output == O_KTO && buf_puts(row, label ? ",\"label\":true" : ",\"label\":false") < 0) return -1;
    if (buf_puts(row, ",\"source\":{\"rule\":\"") < 0 || buf_puts(row, rule) < 0) return -1;
    if (buf_puts(row, r->comparison ? "\",\"comparison_id\":" : "\",\"conversation_id\":") < 0
        || put_json_str(row, r->record_id) < 0 || buf_puts(row, ",\"message_ids\":[") < 0) return -1;
    for (int k = 0; k < nids; k++)
        if ((k && buf_puts(row, ",") < 0) || put_json_str(row, cmp_ids ? cmp_ids[k] : r->msgs[ids[k]].id) < 0)
            return -1;
    if (buf_puts(row, "]") < 0) return -1;
    if (r->has_persona && (buf_puts(row, ",\"persona\":") < 0 || put_json_str(row, r->persona) < 0)) return -1;
    if (!cmp_ids) {  /* rules.curate_conversation's source(): the non-empty comments on its messages */
        int first = 1;
        for (int k = 0; k < nids; k++) {
            int c = r->msgs[ids[k]].comment;
            if (c < 0) continue;
            Text *t = text_at(cx, c);
            if (!t) return -1;
            if (buf_puts(row, first ? ",\"comments\":[" : ",") < 0 || put_json_str(row, t->clean) < 0) return -1;
            add_pii(pii, t);
            first = 0;
        }
        if (!first && buf_puts(row, "]") < 0) return -1;
    }
    if (buf_puts(row, "}}\n") < 0) return -1;

    /* Its line in the staging index, but the position: split, key, bytes, rule, persona, PII. */
    Buf *f = r->fields;
    char hex[32];
    for (int k = 0; k < 16; k++) { hex[2 * k] = hexd[digest[k] >> 4]; hex[2 * k + 1] = hexd[digest[k] & 15]; }
    f->n = 0;
    if (buf_puts(f, r->split) < 0 || buf_puts(f, "\t") < 0 || buf_put(f, hex, 32) < 0 || buf_puts(f, "\t") < 0
        || put_int(f, row->n) < 0 || buf_puts(f, "\t") < 0 || buf_puts(f, rule) < 0 || buf_puts(f, "\t") < 0
        || buf_put(f, r->persona_json.p, r->persona_json.n) < 0) return -1;
    for (int k = 0; k < 4; k++)
        if (buf_puts(f, k ? "," : "\t") < 0 || put_int(f, pii[k]) < 0) return -1;
    PyObject *item = PyTuple_New(3);
    if (!item) return -1;
    PyTuple_SET_ITEM(item, 0, Py_NewRef(output_names[output]));
    PyTuple_SET_ITEM(item, 1, PyUnicode_DecodeASCII(f->p, f->n, "strict"));  /* (all ASCII: see above) */
    PyTuple_SET_ITEM(item, 2, PyBytes_FromStringAndSize(row->p, row->n));
    if (!PyTuple_GET_ITEM(item, 1) || !PyTuple_GET_ITEM(item, 2)) { Py_DECREF(item); return -1; }
    int rc = PyList_Append(r->rows, item);
    Py_DECREF(item);
    return rc < 0 ? -1 : 1;
}

/* rules._context: the prompt of message `end` whose chain starts at `root`. */
static int context(Rows *r, int root, int end, Prompt *out) {
    Ctx *cx = r->cx;
    out->n = root;
    out->hashed = 0;
    out->role = arena_alloc(&cx->arena, sizeof(int) * (root + 1));
    out->text = arena_alloc(&cx->arena, sizeof(int) * (root + 1));
    if (!out->role || !out->text) return -1;
    for (int k = 0; k < root; k++) { out->role[k] = r->msgs[k].role; out->text[k] = r->msgs[k].text; }
    if (!cx->merge || root == end) return 0;
    int follow_ups = 0;
    Py_ssize_t size = 0;
    for (int k = root + 1; k < end; k++)
        if (r->msgs[k].role == R_USER) { follow_ups++; size += cx->texts.items[r->msgs[k].text].raw.n + 2; }
    if (!follow_ups) return 0;
    int last_user = -1;
    for (int k = root - 1; k >= 0; k--)
        if (out->role[k] == R_USER) { last_user = k; break; }
    if (last_user >= 0) size += cx->texts.items[out->text[last_user]].raw.n;
    char *joined = arena_alloc(&cx->arena, size + 1);
    if (!joined) return -1;
    Py_ssize_t n = 0;
    int first = 1;
    if (last_user >= 0) {
        Str s = cx->texts.items[out->text[last_user]].raw;
        memcpy(joined, s.p, s.n);
        n = s.n;
        first = 0;
    }
    for (int k = root + 1; k < end; k++) {
        if (r->msgs[k].role != R_USER) continue;
        Str s = cx->texts.items[r->msgs[k].text].raw;
        if (!first) { joined[n++] = '\n'; joined[n++] = '\n'; }
        memcpy(joined + n, s.p, s.n);
        n += s.n;
        first = 0;
    }
    Str merged = {joined, n};
    int id = add_text(&cx->texts, merged);
    if (id < 0) return -1;
    if (last_user >= 0) out->text[last_user] = id;
    else { out->role[out->n] = R_USER; out->text[out->n++] = id; }
    return 0;
}

/* rules.curate_conversation with no split-out feedback (at most one, inline, per message: so no
   conflict is possible here; a restaged conversation is curated in Python). */
static int curate_conversation(Rows *r, long *unused) {
    Ctx *cx = r->cx;
    Msg *msgs = r->msgs;
    int *path = arena_alloc(&cx->arena, sizeof(int) * (r->nmsgs + 1));
    if (!path) return -1;
    *unused = 0;
    for (int i = 0; i < r->nmsgs; i++) {
        Msg *m = &msgs[i];
        if (m->role != R_ASSISTANT) continue;
        if (!m->has_fb && m->corrects < 0 && !m->corrected) { (*unused)++; continue; }
        int np = 0;  /* this message back to the first mistake of its chain, then reversed */
        for (int k = i; k >= 0; k = msgs[k].corrects) path[np++] = k;
        for (int k = 0; k < np / 2; k++) { int t = path[k]; path[k] = path[np - 1 - k]; path[np - 1 - k] = t; }
        Prompt prompt;
        if (context(r, path[0], i, &prompt) < 0) return -1;
        int rating = m->has_fb ? m->rating : -1;
        if (m->corrects >= 0 && !m->corrected) {  /* rule 2: final of a chain */
            tally_add(&r->signals, "correction");
            if (rating == 0) tally_add(&r->drops, "correction_final_rated_down");
            else {
                if (make_row(r, O_SFT, "correction", &prompt, m->text, -1, 0, path, np, NULL) < 0) return -1;
                for (int k = 0; k < np - 1; k++) {
                    int ids[2] = {path[k], i};
                    if (make_row(r, O_DPO, "correction", &prompt, m->text, msgs[path[k]].text, 0, ids, 2, NULL) < 0)
                        return -1;
                }
            }
        }
        int self[1] = {i};
        if (rating == 1) {  /* rule 1 */
            tally_add(&r->signals, "thumbs_up");
            if (m->corrected) tally_add(&r->drops, "thumbs_up_then_corrected");
            else {
                if (m->corrects < 0 && make_row(r, O_SFT, "thumbs_up", &prompt, m->text, -1, 0, self, 1, NULL) < 0)
                    return -1;
                if (make_row(r, O_KTO, "thumbs_up", &prompt, m->text, -1, 1, self, 1, NULL) < 0) return -1;
            }
        }
        if (m->has_fb && m->edit >= 0) {  /* rule 3 */
            tally_add(&r->signals, "edit");
            Str a, b;
            if (normalize(&cx->arena, cx->texts.items[m->edit].raw, &a) < 0
                || normalize(&cx->arena, cx->texts.items[m->text].raw, &b) < 0) return -1;
            if (strs_eq(a, b)) tally_add(&r->drops, "edit_unchanged");
            else if (make_row(r, O_SFT, "edit", &prompt, m->edit, -1, 0, self, 1, NULL) < 0
                     || make_row(r, O_DPO, "edit", &prompt, m->edit, m->text, 0, self, 1, NULL) < 0) return -1;
        }
        if (rating == 0) {  /* rule 4 */
            tally_add(&r->signals, "thumbs_down");
            if (make_row(r, O_KTO, "thumbs_down", &prompt, m->text, -1, 0, self, 1, NULL) < 0) return -1;
        }
    }
    return 0;
}

/* records.normalize_rating of a member: 1 up, 0 down, -1 absent; bails on anything else. */
static int rating_of(Parser *ps, int fb) {
    int c = member(ps, fb, "rating");
    if (c < 0) return -1;
    Node *nd = &ps->nodes[c];
    switch (nd->type) {
    case J_TRUE: return 1;
    case J_FALSE: return 0;
    case J_STR:
        if (str_eq(nd->s, "up")) return 1;
        if (str_eq(nd->s, "down")) return 0;
        break;
    case J_NUM:
        if (str_eq(nd->s, "1")) return 1;
        if (str_eq(nd->s, "0") || str_eq(nd->s, "-1")) return 0;
        break;
    }
    ps->bail = 1;
    return -1;
}

/* A conversation record (records.check_conversation, then the curation): its messages read into
   `r->msgs`. Returns 0, or -1 on error; ps->bail set when the line is left to Python. */
static int read_conversation(Rows *r, int top, int *signal, long *assistants) {
    Ctx *cx = r->cx;
    Parser *ps = &cx->ps;
    if (!req_str(ps, top, "conversation_id", &r->record_id)) return 0;
    check_common(ps, top, &r->persona, &r->has_persona);
    int list = member(ps, top, "messages");
    if (ps->bail) return 0;
    if (list < 0 || ps->nodes[list].type != J_ARR || ps->nodes[list].count == 0
        || ps->nodes[list].count > MAX_MESSAGES) { ps->bail = 1; return 0; }
    r->nmsgs = ps->nodes[list].count;
    r->msgs = arena_alloc(&cx->arena, sizeof(Msg) * r->nmsgs);
    if (!r->msgs) return -1;
    *signal = 0;
    *assistants = 0;
    int i = 0;
    for (int c = ps->nodes[list].first; c >= 0; c = ps->nodes[c].next, i++) {
        Msg *m = &r->msgs[i];
        memset(m, 0, sizeof(Msg));
        m->rating = m->edit = m->comment = m->corrects = -1;
        if (ps->nodes[c].type != J_OBJ) { ps->bail = 1; return 0; }
        Str content;
        if (!req_str(ps, c, "id", &m->id)) return 0;
        m->role = role_of(ps, c);
        if (ps->bail || !opt_str(ps, c, "content", &content)) { ps->bail = 1; return 0; }
        for (int k = 0; k < i; k++)
            if (strs_eq(r->msgs[k].id, m->id)) { ps->bail = 1; return 0; }
        if (m->role == R_ASSISTANT) (*assistants)++;
        else if (m->role == R_SYSTEM && i) { ps->bail = 1; return 0; }
        if ((m->text = add_text(&cx->texts, content)) < 0) return -1;
        int fb = member(ps, c, "feedback");
        if (fb >= 0) {
            if (m->role != R_ASSISTANT || ps->nodes[fb].type != J_OBJ) { ps->bail = 1; return 0; }
            m->has_fb = 1;
            m->rating = rating_of(ps, fb);
            Str edit, comment;
            if (opt_str(ps, fb, "edited_content", &edit) && (m->edit = add_text(&cx->texts, edit)) < 0) return -1;
            if (opt_str(ps, fb, "comment", &comment) && comment.n
                && (m->comment = add_text(&cx->texts, comment)) < 0) return -1;
            *signal = 1;
        }
        Str corrects;
        if (opt_str(ps, c, "corrects", &corrects)) {
            if (m->role != R_ASSISTANT) { ps->bail = 1; return 0; }
            for (int k = 0; k < i; k++)
                if (strs_eq(r->msgs[k].id, corrects)) { m->corrects = k; break; }
            if (m->corrects < 0 || r->msgs[m->corrects].role != R_ASSISTANT) { ps->bail = 1; return 0; }
            r->msgs[m->corrects].corrected = 1;
            *signal = 1;
        }
        if (ps->bail) return 0;
    }
    return 0;
}

/* A comparison record (records._check_comparison), then rule 5 (rules.curate_comparison). */
static int read_comparison(Rows *r, int top) {
    Ctx *cx = r->cx;
    Parser *ps = &cx->ps;
    r->comparison = 1;
    if (!req_str(ps, top, "comparison_id", &r->record_id)) return 0;
    check_common(ps, top, &r->persona, &r->has_persona);
    int list = member(ps, top, "prompt");
    if (ps->bail) return 0;
    if (list < 0 || ps->nodes[list].type != J_ARR || ps->nodes[list].count == 0
        || ps->nodes[list].count > MAX_MESSAGES) { ps->bail = 1; return 0; }
    Prompt prompt;
    prompt.hashed = 0;
    prompt.n = ps->nodes[list].count;
    prompt.role = arena_alloc(&cx->arena, sizeof(int) * prompt.n);
    prompt.text = arena_alloc(&cx->arena, sizeof(int) * prompt.n);
    if (!prompt.role || !prompt.text) return -1;
    int i = 0;
    for (int c = ps->nodes[list].first; c >= 0; c = ps->nodes[c].next, i++) {
        Str content;
        if (ps->nodes[c].type != J_OBJ) { ps->bail = 1; return 0; }
        prompt.role[i] = role_of(ps, c);
        if (ps->bail || (prompt.role[i] == R_SYSTEM && i) || !opt_str(ps, c, "content", &content)) {
            ps->bail = 1;
            return 0;
        }
        if ((prompt.text[i] = add_text(&cx->texts, content)) < 0) return -1;
    }
    int resp = member(ps, top, "responses");
    if (ps->bail) return 0;
    if (resp < 0 || ps->nodes[resp].type != J_ARR || ps->nodes[resp].count != 2) { ps->bail = 1; return 0; }
    Str ids[2], contents[2];
    i = 0;
    for (int c = ps->nodes[resp].first; c >= 0; c = ps->nodes[c].next, i++) {
        if (ps->nodes[c].type != J_OBJ || !req_str(ps, c, "id", &ids[i]) || str_eq(ids[i], "tie")
            || !opt_str(ps, c, "content", &contents[i])) { ps->bail = 1; return 0; }
    }
    Str preferred;
    if (ps->bail || strs_eq(ids[0], ids[1]) || !opt_str(ps, top, "preferred", &preferred)) { ps->bail = 1; return 0; }
    int chosen = strs_eq(preferred, ids[0]) ? 0 : strs_eq(preferred, ids[1]) ? 1 : -1;
    if (chosen < 0 && !str_eq(preferred, "tie")) { ps->bail = 1; return 0; }
    if (ps->bail) return 0;
    r->cmp_prompt = prompt;
    r->cmp_chosen = chosen;
    if (chosen >= 0) {
        r->cmp_ids[0] = ids[chosen];
        r->cmp_ids[1] = ids[1 - chosen];
        if ((r->cmp_texts[0] = add_text(&cx->texts, contents[chosen])) < 0
            || (r->cmp_texts[1] = add_text(&cx->texts, contents[1 - chosen])) < 0) return -1;
    }
    return 0;
}

/* rules.curate_comparison: rule 5, a side-by-side gives one DPO pair; a tie gives nothing. */
static int curate_comparison(Rows *r) {
    tally_add(&r->signals, "comparison");
    if (r->cmp_chosen < 0) { tally_add(&r->drops, "comparison_tie"); return 0; }
    return make_row(r, O_DPO, "comparison", &r->cmp_prompt, r->cmp_texts[0], r->cmp_texts[1], 0, NULL, 2,
                    r->cmp_ids) < 0 ? -1 : 0;
}

/* A Python str as UTF-8 (None: absent); bails on a lone surrogate (the Python path decides). */
static int py_text(Parser *ps, PyObject *obj, Str *out) {
    if (obj == Py_None) return 0;
    if (!PyUnicode_Check(obj)) { ps->bail = 1; return 0; }
    out->p = PyUnicode_AsUTF8AndSize(obj, &out->n);
    if (!out->p) { PyErr_Clear(); ps->bail = 1; return 0; }
    return 1;
}

/* stage.join_feedback, for a conversation curated again: split-out feedback `extra`
   [(message id, rating 1 up / 0 down / -1 none, edited content, comment)] joined to its messages;
   `lost` gets (index, reason) of those that match no assistant message. A message that would
   carry two signals bails: only the Python curation has rules for several on one message. */
static int join_extra(Rows *r, PyObject *extra, PyObject *lost) {
    Ctx *cx = r->cx;
    Parser *ps = &cx->ps;
    if (!PyList_Check(extra)) { ps->bail = 1; return 0; }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(extra); k++) {
        PyObject *item = PyList_GET_ITEM(extra, k);
        Str mid, edit, comment;
        long rating;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4 || !py_text(ps, PyTuple_GET_ITEM(item, 0), &mid)) {
            ps->bail = 1;
            return 0;
        }
        rating = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
        if (rating == -1 && PyErr_Occurred()) return -1;
        int has_edit = py_text(ps, PyTuple_GET_ITEM(item, 2), &edit);
        int has_comment = py_text(ps, PyTuple_GET_ITEM(item, 3), &comment);
        if (ps->bail) return 0;
        Msg *m = NULL;
        for (int i = 0; i < r->nmsgs; i++)
            if (strs_eq(r->msgs[i].id, mid)) { m = &r->msgs[i]; break; }
        if (!m || m->role != R_ASSISTANT) {
            PyObject *why = Py_BuildValue("(ns)", k, m ? "not_an_assistant_message" : "unknown_message");
            if (!why || PyList_Append(lost, why) < 0) { Py_XDECREF(why); return -1; }
            Py_DECREF(why);
            continue;
        }
        if (m->has_fb) { ps->bail = 1; return 0; }
        m->has_fb = 1;
        m->rating = (int)rating;
        if (has_edit && (m->edit = add_text(&cx->texts, edit)) < 0) return -1;
        if (has_comment && comment.n && (m->comment = add_text(&cx->texts, comment)) < 0) return -1;
    }
    return 0;
}

/* json.encoder.encode_basestring_ascii: how the staging index writes a persona. */
static int put_ascii_json_str(Buf *b, Str s) {
    static const char hexd[] = "0123456789abcdef";
    char esc[16];
    if (buf_puts(b, "\"") < 0) return -1;
    for (Py_ssize_t i = 0; i < s.n;) {
        unsigned char c = (unsigned char)s.p[i];
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
            if (buf_put(b, s.p + i, 1) < 0) return -1;
            i++;
            continue;
        }
        unsigned u = next_cp((const unsigned char *)s.p, &i);
        const char *short_esc = u == '"' ? "\\\"" : u == '\\' ? "\\\\" : u == '\n' ? "\\n" : u == '\r' ? "\\r"
                                : u == '\t' ? "\\t" : u == '\b' ? "\\b" : u == '\f' ? "\\f" : NULL;
        if (short_esc) { if (buf_puts(b, short_esc) < 0) return -1; continue; }
        unsigned units[2] = {u, 0};
        int nu = 1;
        if (u >= 0x10000) { u -= 0x10000; units[0] = 0xD800 | (u >> 10); units[1] = 0xDC00 | (u & 0x3FF); nu = 2; }
        for (int k = 0; k < nu; k++) {
            unsigned v = units[k];
            esc[0] = '\\'; esc[1] = 'u';
            esc[2] = hexd[(v >> 12) & 15]; esc[3] = hexd[(v >> 8) & 15]; esc[4] = hexd[(v >> 4) & 15]; esc[5] = hexd[v & 15];
            if (buf_put(b, esc, 6) < 0) return -1;
        }
    }
    return buf_puts(b, "\"");
}

/* rules.split_of: "eval" for a seeded `eval_fraction` of record ids. `seed_prefix` is
   f"{seed}\x00"; the draw is compared with eval_fraction * 2**64 exactly, as Python compares
   an int with a float. */
static const char *split_of(Str seed_prefix, const char *kind, Str id, double eval_fraction) {
    B2b h;
    uint8_t d[8];
    b2b_init(&h, 8);
    b2b_update(&h, seed_prefix.p, seed_prefix.n);
    b2b_update(&h, kind, strlen(kind) + 1);  /* with its NUL: the \x00 separator */
    b2b_update(&h, id.p, id.n);
    b2b_final(&h, d);
    uint64_t draw = 0;
    for (int k = 0; k < 8; k++) draw = (draw << 8) | d[k];
    double limit = eval_fraction * 18446744073709551616.0;  /* exact: a power of two */
    if (!(limit > 0)) return "train";
    if (limit >= 18446744073709551616.0) return "eval";
    uint64_t floor_limit = (uint64_t)limit;  /* exact: a double this large has no fraction to lose */
    int is_whole = (double)floor_limit == limit;
    return (is_whole ? draw < floor_limit : draw <= floor_limit) ? "eval" : "train";
}

/* The record's tally for the staging index, as stage.stage_rows writes it (orjson, compact). */
static PyObject *tally_json(Rows *r) {
    Buf b = {NULL, 0, 0};
    Tally *parts[2] = {&r->signals, &r->drops};
    const char *heads[2] = {"{\"signals\":{", "},\"drops\":{"};
    PyObject *out = NULL;
    for (int p = 0; p < 2; p++) {
        if (buf_puts(&b, heads[p]) < 0) goto done;
        for (int k = 0; k < parts[p]->n; k++) {
            if (buf_puts(&b, k ? ",\"" : "\"") < 0 || buf_puts(&b, parts[p]->name[k]) < 0 || buf_puts(&b, "\":") < 0
                || put_int(&b, parts[p]->count[k]) < 0) goto done;
        }
    }
    if (buf_puts(&b, "},\"conflicts\":[]}") < 0) goto done;
    out = PyUnicode_DecodeUTF8(b.p, b.n, "strict");
done:
    PyMem_Free(b.p);
    return out;
}

/* Scratch memory kept from line to line (a build calls this a million times). */
static Node *kept_nodes;
static int kept_nodes_cap;
static Text *kept_texts;
static int kept_texts_cap;
static Buf kept_row, kept_fields;
static int busy;

/* stage_line(merge, scrub, seed_prefix, eval_fraction, raw[, extra])
       -> None | (kind, id, unused, staged[, lost])

   The build's options come first (stage.py binds them once with functools.partial): `merge` for
   --correction-prompt merge, `scrub` (see the top of this file), `seed_prefix` f"{seed}\x00" and
   `eval_fraction` for rule 9. Then the line, `raw`.

   kind 0: a conversation (unused: its assistant messages without a signal), 1: a comparison
   (unused 0). staged: None when the record stages nothing (no signal, or nothing to report),
   else (split, tally, rows): its tally for the staging index (JSON) and per row
   (output, its index line's fields after the position, row JSON line), as stage.stage_rows makes
   them. With `extra` (split-out feedback, see join_extra), the line is a conversation curated
   again, and `lost` lists the feedback that matched no assistant message. */
static PyObject *stage_line(PyObject *self, PyObject *args) {
    Py_buffer raw;
    int merge;
    PyObject *scrub, *extra = NULL, *lost = NULL;
    Str seed_prefix;
    double eval_fraction;
    if (!PyArg_ParseTuple(args, "pOy#dy*|O", &merge, &scrub, &seed_prefix.p, &seed_prefix.n, &eval_fraction, &raw,
                          &extra))
        return NULL;
    if (busy) { PyBuffer_Release(&raw); Py_RETURN_NONE; }  /* (re-entered from `scrub`: never in a build) */
    busy = 1;
    const char *line = raw.buf;
    Py_ssize_t len = raw.len;
    PyObject *result = NULL;
    Ctx cx;
    memset(&cx, 0, sizeof cx);
    cx.scrub = scrub;
    cx.merge = merge;
    cx.ps.nodes = kept_nodes;
    cx.ps.cap = kept_nodes_cap;
    cx.texts.items = kept_texts;
    cx.texts.cap = kept_texts_cap;
    arena_init(&cx.arena);
    Rows r;
    memset(&r, 0, sizeof r);
    r.cx = &cx;
    r.row = &kept_row;
    r.fields = &kept_fields;
    if (len == 0 || line[0] != '{' || !valid_utf8((const unsigned char *)line, len)) goto bail;
    cx.ps.at = line;
    cx.ps.end = line + len;
    cx.ps.arena = &cx.arena;
    int top = parse_value(&cx.ps, 0);
    if (top < 0) goto done;
    skip_ws(&cx.ps);
    if (cx.ps.bail || cx.ps.at != cx.ps.end) goto bail;
    Str type;
    if (!opt_str(&cx.ps, top, "type", &type) || cx.ps.bail) goto bail;
    if (!(cx.keep = PyList_New(0)) || !(r.rows = PyList_New(0))) goto done;
    int kind;
    long unused = 0;
    int signal = 1;
    if (str_eq(type, "conversation")) {
        kind = 0;
        long assistants = 0;
        if (read_conversation(&r, top, &signal, &assistants) < 0) goto done;
        if (cx.ps.bail) goto bail;
        unused = assistants;
        if (extra) {  /* curated again, with its split-out feedback (always curated, as in Python) */
            if (!(lost = PyList_New(0)) || join_extra(&r, extra, lost) < 0) goto done;
            if (cx.ps.bail) goto bail;
            signal = 1;
        }
    } else if (str_eq(type, "comparison") && !extra) {
        kind = 1;
        if (read_comparison(&r, top) < 0) goto done;
        if (cx.ps.bail) goto bail;
    } else goto bail;  /* a feedback record (few), or no record type: Python reads it */
    PyObject *staged = NULL;
    if (signal) {
        Str untagged = {"(none)", 6};  /* rules.UNTAGGED */
        r.split = split_of(seed_prefix, kind ? "comparison" : "conversation", r.record_id, eval_fraction);
        if (put_ascii_json_str(&r.persona_json, r.has_persona ? r.persona : untagged) < 0) goto done;
        if (kind == 0 ? curate_conversation(&r, &unused) < 0 : curate_comparison(&r) < 0) goto done;
        for (long k = 0; k < r.same_answers; k++) tally_add(&r.drops, "dpo_chosen_equals_rejected");
        if (PyList_GET_SIZE(r.rows) || r.signals.n || r.drops.n) {  /* else: nothing to report */
            PyObject *tally = tally_json(&r);
            if (!tally) goto done;
            staged = Py_BuildValue("(sNO)", r.split, tally, r.rows);
            if (!staged) goto done;
        }
    }
    PyObject *id = PyUnicode_DecodeUTF8(r.record_id.p, r.record_id.n, "strict");
    if (!staged) staged = Py_NewRef(Py_None);
    result = lost ? Py_BuildValue("(iNlNO)", kind, id, unused, staged, lost)
                  : Py_BuildValue("(iNlN)", kind, id, unused, staged);
    goto done;
bail:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(cx.keep);
    Py_XDECREF(r.rows);
    Py_XDECREF(lost);
    PyMem_Free(r.persona_json.p);
    kept_nodes = cx.ps.nodes;
    kept_nodes_cap = cx.ps.cap;
    kept_texts = cx.texts.items;
    kept_texts_cap = cx.texts.cap;
    if (kept_nodes_cap > KEEP_AT_MOST) {  /* a huge line's scratch is not kept for the next ones */
        PyMem_Free(kept_nodes);
        kept_nodes = NULL;
        kept_nodes_cap = 0;
    }
    if (kept_texts_cap > KEEP_AT_MOST) {
        PyMem_Free(kept_texts);
        kept_texts = NULL;
        kept_texts_cap = 0;
    }
    Buf *bufs[2] = {&kept_row, &kept_fields};
    for (int k = 0; k < 2; k++)
        if (bufs[k]->cap > KEEP_AT_MOST * 64) {
            PyMem_Free(bufs[k]->p);
            bufs[k]->p = NULL;
            bufs[k]->n = bufs[k]->cap = 0;
        }
    arena_free(&cx.arena);
    PyBuffer_Release(&raw);
    busy = 0;
    return result;
}

static PyMethodDef methods[] = {
    {"stage_line", stage_line, METH_VARARGS,
     "stage_line(merge, scrub, seed_prefix, eval_fraction, raw[, extra]) -> None | (kind, id, unused, staged"
     "[, lost]): see _native.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    for (int k = 0; k < 3; k++)
        if (!output_names[k] && !(output_names[k] = PyUnicode_InternFromString(OUTPUT_NAMES[k]))) return NULL;
    return PyModule_Create(&module);
}
