// The worker's secret arena: one reservation of memory that the kernel keeps away from everyone else, carved into
// the trusted core's secret buffers (si_secret_alloc). Preferred backing is memfd_secret (pages removed from the
// kernel's direct map: unreadable through /proc/PID/mem, ptrace or process_vm_readv, even by root); where the
// kernel lacks it, anonymous memory that is mlock'ed (never swapped) and MADV_DONTDUMP (never in a core dump).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace si {

enum class SecretMemoryKind : uint32_t {
    memfd_secret = 1,  // removed from the direct map
    mlock = 2,         // fallback: locked and excluded from core dumps, but readable by a privileged ptracer
    unlocked = 3,      // fallback when even mlock is refused (RLIMIT_MEMLOCK): only excluded from core dumps
};

const char* secret_memory_kind_name(SecretMemoryKind kind);
// The kind as the measured configuration names it: "memfd_secret", "mlock" or "unlocked".
const char* secret_memory_kind_config(SecretMemoryKind kind);

class SecretArena {
public:
    // Reserves `bytes` of address space (pages are committed when first touched). try_memfd_secret = false skips
    // memfd_secret (for testing the fallback). Throws si::Error when no memory can be reserved at all.
    static std::unique_ptr<SecretArena> create(size_t bytes, bool try_memfd_secret = true);
    ~SecretArena();
    SecretArena(const SecretArena&) = delete;
    SecretArena& operator=(const SecretArena&) = delete;

    // Zero-filled, 64-byte aligned; nullptr when the arena is exhausted. n == 0 returns a unique minimal block.
    void* allocate(size_t n);
    // Zeroes and returns a block. A pointer or size that does not match an allocation aborts the process: it is
    // a bug in the trusted core, and continuing could hand the same secret memory out twice.
    void free(void* p, size_t n);
    // Routes si_secret_alloc / si_secret_free to this arena (the arena must outlive every secret buffer).
    void install();
    // Zeroes every live block but `keep` (the stack the caller runs on), for a process about to exit.
    void wipe_all_except(const void* keep);

    SecretMemoryKind kind() const { return kind_; }
    // Why a fallback is in use (empty with memfd_secret).
    const std::string& note() const { return note_; }
    const void* base() const { return base_; }
    size_t capacity() const { return size_; }
    size_t in_use() const;

private:
    SecretArena() = default;
    uint8_t* base_ = nullptr;
    size_t size_ = 0;
    SecretMemoryKind kind_ = SecretMemoryKind::unlocked;
    std::string note_;
    mutable std::mutex mu_;
    std::map<size_t, size_t> free_;  // offset -> length, coalesced
    std::map<size_t, size_t> used_;  // offset -> rounded length
};

}  // namespace si
