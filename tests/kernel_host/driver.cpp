// Runs the device format structs of core/orcd/quant/*.cuh on the host.
//
//   driver SUFFIX N ROW_BYTES < row [xq int8 x N*QK, xd float32 x N*QK/32] > result
//
// reads one row of N blocks of the format with kernel suffix SUFFIX, in its VRAM
// layout (ROW_BYTES bytes: QuantFormat.to_vram), and, for INT8 formats, q8
// activations for the same N*QK values, and writes, little-endian:
//   int32 [5]             QK, BYTES, PIECES, RUNS * RUN, INT8
//   int32 [PIECES, RUNS * RUN]  where each piece's values sit in a block
//   float32 [N, QK]       every block dequantized with F::load (NaN where no piece wrote)
//   float32 [N, PIECES]   F::dot8 of every piece (INT8 formats only)
//
//   driver q8 < float32 x 32*G > result
//
// writes quantize_group of each 32-value group: int8 x 32*G, then float32 x G.
//
//   driver halves < float32 x M > result
//
// writes f32_to_f16 and f32_to_bf16 of the M floats (uint16 each), then
// f16_to_f32 and bf16_to_f32 of all 65536 bit patterns (float32 each).
#include "builtins.h"

#include "formats.cuh"   // generated from the format table (the test writes it)

#include <cmath>
#include <vector>

// n bytes, 16-byte aligned like a device tensor (the alignment the loads rely on),
// with 16 bytes of slack: ld32_a1 may read the word after a row's last byte, as a
// device allocation's page allows.
struct Buffer {
    std::vector<uint4> words;
    explicit Buffer(size_t n) : words((n + 15) / 16 + 1) {}
    u8* bytes() { return reinterpret_cast<u8*>(words.data()); }
};

static std::vector<u8> read_all() {
    std::vector<u8> in;
    u8 chunk[1 << 16];
    for (size_t got; (got = std::fread(chunk, 1, sizeof chunk, stdin)) > 0;) in.insert(in.end(), chunk, chunk + got);
    return in;
}
template <class T>
static void write(const T* p, size_t count) { std::fwrite(p, sizeof(T), count, stdout); }

template <class F>
static int run(const std::vector<u8>& in, long n, size_t row_bytes) {
    constexpr int PER = F::RUNS * F::RUN;
    const size_t want = row_bytes + (F::INT8 ? n * (F::QK + F::QK / 32 * 4) : 0);
    if (in.size() != want) {
        std::fprintf(stderr, "%zu input bytes, expected %zu for a row of %ld blocks\n", in.size(), want, n);
        return 1;
    }
    Buffer row(row_bytes), xq(n * F::QK);
    std::vector<float> xd(n * F::QK / 32);
    std::memcpy(row.bytes(), in.data(), row_bytes);
    if (F::INT8) {
        std::memcpy(xq.bytes(), in.data() + row_bytes, n * F::QK);
        std::memcpy(xd.data(), in.data() + row_bytes + n * F::QK, xd.size() * 4);
    }
    const int header[5] = {F::QK, F::BYTES, F::PIECES, PER, F::INT8};
    int pos[F::PIECES][PER];
    for (int p = 0; p < F::PIECES; ++p)
        for (int r = 0; r < F::RUNS; ++r)
            for (int i = 0; i < F::RUN; ++i) pos[p][r * F::RUN + i] = F::base(p) + r * F::STRIDE + i;
    write(header, 5);
    write(&pos[0][0], F::PIECES * PER);

    std::vector<float> values(n * F::QK, NAN);  // values: [n, QK]
    for (long b = 0; b < n; ++b)
        for (int p = 0; p < F::PIECES; ++p) {
            float v[PER];
            F::load(row.bytes(), (int)n, (int)b, p, v);
            for (int k = 0; k < PER; ++k) values[b * F::QK + pos[p][k]] = v[k];
        }
    write(values.data(), values.size());

    if constexpr (F::INT8) {
        std::vector<float> dots(n * F::PIECES);  // dots: [n, PIECES]
        for (long b = 0; b < n; ++b)
            for (int p = 0; p < F::PIECES; ++p)
                dots[b * F::PIECES + p] = F::dot8(row.bytes(), (int)n, (int)b, p,
                                                  reinterpret_cast<const int*>(xq.bytes() + b * F::QK),
                                                  xd.data() + b * F::QK / 32);
        write(dots.data(), dots.size());
    }
    return 0;
}

static int q8(const std::vector<u8>& in) {
    const size_t groups = in.size() / 128;
    std::vector<float> x(groups * 32), d(groups);
    std::vector<u32> q(groups * 8);
    std::memcpy(x.data(), in.data(), x.size() * 4);
    for (size_t g = 0; g < groups; ++g) d[g] = quantize_group(x.data() + 32 * g, q.data() + 8 * g);
    write(q.data(), q.size());
    write(d.data(), d.size());
    return 0;
}

static int halves(const std::vector<u8>& in) {
    std::vector<float> x(in.size() / 4);
    std::memcpy(x.data(), in.data(), x.size() * 4);
    std::vector<u16> h(x.size()), bh(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = f32_to_f16(x[i]), bh[i] = f32_to_bf16(x[i]);
    std::vector<float> from_h(65536), from_bh(65536);
    for (u32 i = 0; i < 65536; ++i) from_h[i] = f16_to_f32((u16)i), from_bh[i] = bf16_to_f32((u16)i);
    write(h.data(), h.size());
    write(bh.data(), bh.size());
    write(from_h.data(), 65536);
    write(from_bh.data(), 65536);
    return 0;
}

#define ENTRY(NAME, F, TYPE_ID) {#NAME, run<F>},
static const struct {
    const char* name;   // the kernel-name suffix
    int (*run)(const std::vector<u8>&, long, size_t);
} FORMATS[] = {ORCD_FORMATS(ENTRY)};
#undef ENTRY

int main(int argc, char** argv) {
    if (argc == 2 && !std::strcmp(argv[1], "halves")) return halves(read_all());
    if (argc == 2 && !std::strcmp(argv[1], "q8")) return q8(read_all());
    if (argc == 4)
        for (const auto& f : FORMATS)
            if (!std::strcmp(f.name, argv[1])) return f.run(read_all(), std::atol(argv[2]), std::atol(argv[3]));
    std::fprintf(stderr, "usage: driver SUFFIX N ROW_BYTES|q8|halves < input > output\n");
    return 2;
}
