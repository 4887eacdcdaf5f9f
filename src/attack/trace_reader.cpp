#include "attack/trace_reader.h"

#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace si::attack {

int64_t TraceEntry::count() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
}

TraceReader::TraceReader(const std::string& dir) : dir_(dir) {
    const std::string path = dir + "/index.jsonl";
    std::ifstream f(path);
    if (!f) fail(Status::io, path + ": cannot open the trace index");
    std::string line;
    while (std::getline(f, line)) {
        if (line.empty()) continue;
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(line);
            TraceEntry e;
            e.seq = j.at("seq").get<uint64_t>();
            e.layer = j.at("layer").get<int>();
            e.op = j.at("op").get<std::string>();
            e.role = j.at("role").get<std::string>();
            e.dtype = j.at("dtype").get<std::string>();
            e.shape = j.at("shape").get<std::vector<int64_t>>();
            e.file = j.at("file").get<std::string>();
            entries_.push_back(std::move(e));
        } catch (const nlohmann::json::exception& ex) {
            fail(Status::format, path + ": bad trace index line: " + ex.what());
        }
    }
}

std::string TraceReader::raw(const TraceEntry& e, size_t elem) const {
    const std::string path = dir_ + "/" + e.file;
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(Status::io, path + ": cannot open trace tensor");
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string bytes = ss.str();
    if (bytes.size() < 10 || bytes.compare(1, 5, "NUMPY") != 0) fail(Status::format, path + ": not a .npy file");
    const size_t hlen = uint8_t(bytes[8]) | (size_t(uint8_t(bytes[9])) << 8);
    const size_t want = size_t(e.count()) * elem;
    if (bytes.size() != 10 + hlen + want) fail(Status::format, path + ": size does not match the indexed shape");
    return bytes.substr(10 + hlen);
}

std::vector<double> TraceReader::load(const TraceEntry& e, bool as_signed) const {
    const size_t n = size_t(e.count());
    std::vector<double> out(n);
    if (e.dtype == "int8") {
        const std::string b = raw(e, 1);
        for (size_t i = 0; i < n; ++i) out[i] = double(int8_t(b[i]));
    } else if (e.dtype == "uint8") {
        const std::string b = raw(e, 1);
        for (size_t i = 0; i < n; ++i) out[i] = double(uint8_t(b[i]));
    } else if (e.dtype == "int32" || e.dtype == "uint32") {
        const std::string b = raw(e, 4);
        for (size_t i = 0; i < n; ++i) {
            uint32_t v;
            std::memcpy(&v, b.data() + 4 * i, 4);
            out[i] = (e.dtype == "int32" || as_signed) ? double(int32_t(v)) : double(v);
        }
    } else if (e.dtype == "float32") {
        const std::string b = raw(e, 4);
        for (size_t i = 0; i < n; ++i) {
            float v;
            std::memcpy(&v, b.data() + 4 * i, 4);
            out[i] = double(v);
        }
    } else if (e.dtype == "float64") {
        const std::string b = raw(e, 8);
        std::memcpy(out.data(), b.data(), n * 8);
    } else {
        fail(Status::format, e.file + ": unknown trace dtype " + e.dtype);
    }
    return out;
}

std::vector<uint32_t> TraceReader::load_u32(const TraceEntry& e) const {
    if (e.dtype != "int32" && e.dtype != "uint32") fail(Status::invalid_argument, e.file + ": not a 32-bit integer tensor");
    const std::string b = raw(e, 4);
    std::vector<uint32_t> out(size_t(e.count()));
    std::memcpy(out.data(), b.data(), out.size() * 4);
    return out;
}

}  // namespace si::attack
