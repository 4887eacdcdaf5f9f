// The HTTP server tests' fixtures: stories260K loaded once through the C API, and si::server::Server on a free
// loopback port served by a thread of the test process.
#pragma once
#include <httplib.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "secureinfer.h"
#include "server/server.h"
#include "testutil.h"

namespace si::test {

inline si_model* stories_model() {
    static si_model* m = [] {
        si_model_params mp = si_model_default_params();
        const std::string tok = shared("models/tok512.bin");
        mp.tokenizer_path = tok.c_str();
        si_model* out = nullptr;
        EXPECT_EQ(si_model_load(shared("models/stories260K.bin").c_str(), &mp, &out), SI_OK) << si_last_error();
        return out;
    }();
    return m;
}

class LocalServer {
public:
    explicit LocalServer(const char* accelerator = "cpu", int parallel = 1) {
        si_context_params cp = si_context_default_params();
        cp.n_threads = 1;
        cp.accelerator = accelerator;
        si::server::Options o;
        o.port = 0;
        o.model_id = "stories260K";
        o.mode_name = "secureinfer";
        o.parallel = parallel;
        server_ = std::make_unique<si::server::Server>(stories_model(), cp, o);
        port_ = server_->bind();
        thread_ = std::thread([this] { server_->run(); });
        while (!server_->running()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ~LocalServer() {
        server_->stop();
        thread_.join();
    }
    LocalServer(const LocalServer&) = delete;
    LocalServer& operator=(const LocalServer&) = delete;

    int port() const { return port_; }
    std::string url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/"; }
    httplib::Client client() const {
        httplib::Client c("127.0.0.1", port_);
        c.set_read_timeout(120, 0);
        return c;
    }

private:
    std::unique_ptr<si::server::Server> server_;
    int port_ = 0;
    std::thread thread_;
};

}  // namespace si::test
