// The simulator's scheduler: runs a grid one block at a time, each CUDA thread of
// the block a fiber with its own stack. A fiber runs until it reaches a barrier
// (__syncthreads or a warp collective), then yields; a barrier opens when every
// live thread it names has arrived. Threads that return count as gone: a barrier
// waits only for threads that can still reach it. If every live fiber waits and
// no barrier can open, the kernel would hang on a GPU: sim_launch reports which
// threads wait where and returns an error instead.
//
// Context switches are a few instructions of assembly on x86-64 (ucontext's
// swapcontext makes a system call per switch), ucontext elsewhere.
#include "sim.h"

#include <sys/mman.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace orcd_sim {

dim3 block_idx, block_dim, grid_dim;
Fiber* current = nullptr;
unsigned char* dynamic_shared = nullptr;
static size_t dynamic_shared_bytes = 0;

enum State { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
    void* sp = nullptr;  // saved stack pointer (x86-64)
#if !defined(__x86_64__)
    ucontext_t ctx;
#endif
    dim3 tid;
    int linear = 0;
    State state = READY;
    unsigned long long gen = 0;  // the barrier generation it waits to see pass
    const char* where = "";
};

struct Warp {
    unsigned live = 0, arrived = 0, mask = 0;  // mask: the lanes the open rendezvous names
    unsigned long long gen = 0;
    uint64_t value[32] = {};
    uint64_t last[32] = {};   // the deposits of the last rendezvous that opened
};

static const size_t STACK = 256 << 10;
static std::vector<Fiber> fibers;
static std::vector<Warp> warps;
static unsigned char* stacks = nullptr;
static size_t stacks_for = 0;
static int live = 0, arrived = 0;
static unsigned long long block_gen = 0;
static void (*kernel)(void**) = nullptr;
static void** kernel_args = nullptr;
static std::string failure;

#if defined(__x86_64__)
static void* scheduler_sp = nullptr;
extern "C" void orcd_sim_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.globl orcd_sim_switch
.hidden orcd_sim_switch
.type orcd_sim_switch,@function
orcd_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size orcd_sim_switch, .-orcd_sim_switch
)");
static void to_scheduler() { orcd_sim_switch(&current->sp, scheduler_sp); }
static void to_fiber(Fiber& f) { orcd_sim_switch(&scheduler_sp, f.sp); }
#else
static ucontext_t scheduler_ctx;
static void to_scheduler() { swapcontext(&current->ctx, &scheduler_ctx); }
static void to_fiber(Fiber& f) { swapcontext(&scheduler_ctx, &f.ctx); }
#endif

const dim3& thread_idx() { return current->tid; }

void fault(const char* what) {
    if (failure.empty()) {
        char at[96];
        std::snprintf(at, sizeof at, " (block %u,%u,%u thread %d)", block_idx.x, block_idx.y, block_idx.z,
                      current ? current->linear : -1);
        failure = std::string(what, what + std::strcspn(what, "\n")) + at;
    }
}
void global_only(const void* p) {
    const auto* b = static_cast<const unsigned char*>(p);
    if (dynamic_shared && b >= dynamic_shared && b < dynamic_shared + dynamic_shared_bytes)
        fault("read-only global load (__ldg) of a shared memory address\n");
}
int lane_id() { return current->linear & 31; }

static void open_block_barrier() {
    if (arrived > 0 && arrived == live) {
        arrived = 0;
        ++block_gen;
    }
}

static void open_warp_barrier(Warp& w) {
    const unsigned need = w.mask & w.live;
    if (w.arrived && (w.arrived & need) == need) {
        for (int l = 0; l < 32; ++l) w.last[l] = w.value[l];
        w.arrived = 0;
        w.mask = 0;
        ++w.gen;
    }
}

void sync_block() {
    Fiber* f = current;
    f->gen = block_gen;
    f->state = WAIT_BLOCK;
    f->where = "__syncthreads";
    ++arrived;
    open_block_barrier();
    while (block_gen == f->gen) to_scheduler();
    f->state = READY;
}

void warp_exchange(unsigned mask, uint64_t value, uint64_t* all) {
    Fiber* f = current;
    Warp& w = warps[f->linear >> 5];
    const unsigned bit = 1u << (f->linear & 31);
    if (!(mask & bit)) failure = "a lane called a warp collective whose mask does not name it";
    if (!w.arrived) w.mask = mask | bit;
    else if (w.mask != (mask | bit)) failure = "lanes of one warp collective disagree on its mask";
    w.value[f->linear & 31] = value;
    w.arrived |= bit;
    f->gen = w.gen;
    f->state = WAIT_WARP;
    f->where = "a warp collective";
    open_warp_barrier(w);
    while (w.gen == f->gen) to_scheduler();
    for (int l = 0; l < 32; ++l) all[l] = w.last[l];
    f->state = READY;
}

static void fiber_body() {
    Fiber* f = current;
    kernel(kernel_args);
    f->state = DONE;
    --live;
    warps[f->linear >> 5].live &= ~(1u << (f->linear & 31));
    open_block_barrier();
    open_warp_barrier(warps[f->linear >> 5]);
    to_scheduler();
}

#if defined(__x86_64__)
static void fiber_entry() {
    fiber_body();
    std::abort();  // never resumed after DONE
}
static void prepare(Fiber& f, unsigned char* stack) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + STACK) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                                  // entry's return address: none
    *--sp = reinterpret_cast<uint64_t>(&fiber_entry);          // popped by `ret`
    for (int i = 0; i < 6; ++i) *--sp = 0;                      // rbp rbx r12 r13 r14 r15
    *--sp = 0x037F00001F80ull;                                  // mxcsr (low), x87 control word
    f.sp = sp;
}
#else
static void prepare(Fiber& f, unsigned char* stack) {
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_body, 0);
}
#endif

static bool run_block(int n) {
    live = n;
    arrived = 0;
    for (int w = 0; w < (n + 31) / 32; ++w) {
        warps[w] = Warp();
        const int lanes = std::min(32, n - 32 * w);
        warps[w].live = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
    }
    for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        f = Fiber();
        f.linear = i;
        f.tid = dim3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
        prepare(f, stacks + (size_t)i * STACK);
    }
    while (live > 0) {
        bool ran = false;
        for (int i = 0; i < n; ++i) {
            Fiber& f = fibers[i];
            if (f.state == DONE) continue;
            if (f.state == WAIT_BLOCK && f.gen == block_gen) continue;
            if (f.state == WAIT_WARP && f.gen == warps[i >> 5].gen) continue;
            current = &f;
            to_fiber(f);
            ran = true;
        }
        if (!ran) {
            char msg[256];
            const Fiber* w = nullptr;
            for (int i = 0; i < n && !w; ++i)
                if (fibers[i].state != DONE) w = &fibers[i];
            std::snprintf(msg, sizeof msg,
                          "deadlock in block (%u,%u,%u): %d live threads wait, e.g. thread %d at %s "
                          "(%d of them at __syncthreads)", block_idx.x, block_idx.y, block_idx.z, live,
                          w ? w->linear : -1, w ? w->where : "?", arrived);
            failure = msg;
            return false;
        }
    }
    return true;
}

}  // namespace orcd_sim

// Run fn (a kernel trampoline) over the grid. Returns 0, or -1 with the reason in
// orcd_sim_error().
extern "C" int orcd_sim_launch(void (*fn)(void**), void** args, unsigned gx, unsigned gy, unsigned gz,
                               unsigned bx, unsigned by, unsigned bz, unsigned long shared) {
    using namespace orcd_sim;
    const size_t n = (size_t)bx * by * bz;
    if (n == 0 || n > 1024) {
        failure = "block of " + std::to_string(n) + " threads";
        return -1;
    }
    if (stacks_for < n) {
        if (stacks) munmap(stacks, stacks_for * STACK);
        stacks = static_cast<unsigned char*>(mmap(nullptr, n * STACK, PROT_READ | PROT_WRITE,
                                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (stacks == MAP_FAILED) {
            stacks = nullptr;
            stacks_for = 0;
            failure = "no memory for fiber stacks";
            return -1;
        }
        stacks_for = n;
    }
    fibers.assign(n, Fiber());
    warps.assign((n + 31) / 32, Warp());
    std::vector<unsigned char> smem(shared ? shared : 1, 0xFF);  // uninitialised: poisoned
    dynamic_shared = smem.data();
    dynamic_shared_bytes = smem.size();
    kernel = fn;
    kernel_args = args;
    failure.clear();
    grid_dim = dim3{gx, gy, gz};
    block_dim = dim3{bx, by, bz};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                block_idx = dim3{x, y, z};
                std::fill(smem.begin(), smem.end(), 0xFF);
                if (!run_block((int)n)) return -1;
                if (!failure.empty()) return -1;
            }
    return 0;
}

extern "C" const char* orcd_sim_error() { return orcd_sim::failure.c_str(); }
