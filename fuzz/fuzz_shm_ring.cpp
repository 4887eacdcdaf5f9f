// libFuzzer target for the worker's side of the host-worker shared-memory ring (src/host/shm_ring.h): every byte of
// the ring is the host's to write, at any moment. The worker must accept only a layout that fits the region it
// mapped, and answer any op and length the host writes (also while the host rewrites the header during the call)
// without reading or writing outside the request and response areas, and with a response length within its own
// copy of the layout. The region is one allocation of exactly its size, so the sanitizer catches any access past it.
//
// The first input byte picks how the header is made:
//   0   raw: the header page is the input's bytes, the region 1 to 8 pages long (read_layout must refuse or fit)
//   1   valid for a capacity the input chooses, then up to 8 of its 64-bit words overwritten by the input
// Then messages, each: op (u32), length (u64), the core's return code (i8), the response length it claims (u32),
// how many response bytes it writes (u32, capped at the area), and a 64-bit value the host writes over a header word
// (index u8) while the core runs; the request area holds the input's remaining bytes.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "host/shm_ring.h"

using namespace si;

namespace {

struct Reader {
    const uint8_t* p;
    size_t n;
    template <class T>
    T get() {
        T v{};
        const size_t k = n < sizeof v ? n : sizeof v;
        std::memcpy(&v, p, k);
        p += k;
        n -= k;
        return v;
    }
};

constexpr size_t kMaxCapacity = size_t(64) << 10;
constexpr int kMaxMessages = 8;

// The stand-in core: checks what the worker hands it, then writes what the input says.
struct Core {
    uint8_t* region;
    const ring::Layout* l;
    ring::Header* h;
    int rc;
    uint32_t claimed, writes;
    uint8_t word;
    uint64_t value;
};

int process(void* ctx, const uint8_t* req, size_t n, uint8_t* resp, size_t cap, size_t* len) {
    auto* c = static_cast<Core*>(ctx);
    if (req != c->region + c->l->request_offset || n > c->l->request_capacity) __builtin_trap();
    if (resp != c->region + c->l->response_offset || cap != c->l->response_capacity) __builtin_trap();
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < n; ++i) sink = sink ^ req[i];  // every request byte is readable
    // the host rewrites a header word under the worker's feet
    std::memcpy(reinterpret_cast<uint8_t*>(c->h) + (c->word % (sizeof(ring::Header) / 8)) * 8, &c->value, 8);
    const size_t w = c->writes < cap ? c->writes : cap;
    std::memset(resp, 'r', w);  // a failure message without its NUL when w == cap
    *len = c->claimed;
    return c->rc;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    Reader in{data, size};
    const uint8_t mode = in.get<uint8_t>() % 2;
    size_t region_bytes = 0;
    ring::Layout want;
    if (mode == 0) {
        region_bytes = ring::kPage * (1 + in.get<uint8_t>() % 8);
    } else {
        want = ring::make_layout(in.get<uint32_t>() % (kMaxCapacity + 1));
        region_bytes = want.total_bytes;
    }
    auto* region = static_cast<uint8_t*>(std::aligned_alloc(ring::kPage, region_bytes));
    if (!region) return 0;
    std::memset(region, 0, region_bytes);
    auto& h = *reinterpret_cast<ring::Header*>(region);
    if (mode == 0) {
        const size_t k = in.n < ring::kPage ? in.n : ring::kPage;
        std::memcpy(region, in.p, k);
        in.p += k;
        in.n -= k;
    } else {
        ring::init_header(h, want);
        for (int i = 0, edits = in.get<uint8_t>() % 9; i < edits; ++i) {
            const uint8_t word = in.get<uint8_t>();
            const uint64_t v = in.get<uint64_t>();
            std::memcpy(region + (word % (sizeof(ring::Header) / 8)) * 8, &v, 8);
        }
    }
    ring::Layout l;
    if (!ring::read_layout(h, region_bytes, kMaxCapacity, l)) {
        std::free(region);
        return 0;
    }
    // What read_layout accepts fits the region: two disjoint areas after the header page.
    if (l.request_offset < ring::kPage || l.request_capacity > kMaxCapacity || l.response_capacity > kMaxCapacity ||
        l.request_offset + l.request_capacity > l.response_offset ||
        l.response_offset + l.response_capacity > region_bytes)
        __builtin_trap();

    for (int m = 0; m < kMaxMessages && in.n > 0; ++m) {
        ring::store(h.request_op, in.get<uint32_t>());
        ring::store64(h.request_len, in.get<uint64_t>());
        Core c{region, &l, &h, int(in.get<int8_t>()), in.get<uint32_t>(), uint32_t(in.get<uint32_t>() % (kMaxCapacity + 2)),
               in.get<uint8_t>(), in.get<uint64_t>()};
        const size_t k = in.n < l.request_capacity ? in.n : l.request_capacity;
        std::memcpy(region + l.request_offset, in.p, k);
        in.p += k;
        in.n -= k;
        const uint32_t seq = uint32_t(m + 1);
        if (!ring::answer(h, region, l, seq, process, &c)) continue;  // op_exit: nothing to check
        // The answer stays within the worker's own layout, whatever the host wrote meanwhile.
        const uint64_t out_len = ring::load64(h.response_len);
        const int32_t status = ring::load_i32(h.response_status);
        if (out_len > l.response_capacity) __builtin_trap();
        if (status > 0 || status < int32_t(Status::internal)) __builtin_trap();
        if (ring::load(h.response_seq) != seq) __builtin_trap();
    }
    std::free(region);
    return 0;
}
