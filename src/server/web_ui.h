// The web chat at GET / (src/server/web: plain HTML, CSS and JavaScript, no external resources), compiled into the
// binary by src/server/embed_files.cmake.
#pragma once
#include <cstddef>

namespace si::server {

struct WebAsset {
    const char* path;  // "/index.html", "/app.js", ...
    const char* content_type;
    const unsigned char* data;
    size_t size;
};
// Ends with an entry whose path is nullptr.
extern const WebAsset kWebAssets[];

// The asset served at a request path ("/" is "/index.html"); nullptr when there is none.
inline const WebAsset* find_web_asset(const char* path) {
    const char* p = path[0] == '/' && path[1] == '\0' ? "/index.html" : path;
    for (const WebAsset* a = kWebAssets; a->path; ++a) {
        const char *x = a->path, *y = p;
        while (*x && *x == *y) ++x, ++y;
        if (*x == '\0' && *y == '\0') return a;
    }
    return nullptr;
}

}  // namespace si::server
