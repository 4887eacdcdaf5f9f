// Opens a model file of any supported format (decided by content: GGUF magic, else llama2.c) with its vocabulary.
#pragma once
#include <memory>
#include <string>

#include "common/model.h"
#include "common/vocab.h"

namespace si {

namespace gguf {
class Reader;
}

enum class ModelFileFormat { gguf, llama2c };

struct ModelFile {
    ModelWeights weights;
    Vocab vocab;
    ModelFileFormat format = ModelFileFormat::gguf;
    std::string path, vocab_path;
    // GGUF files: the open (memory-mapped) file, for engines that read tensors in their stored format.
    std::shared_ptr<const gguf::Reader> gguf;
};

// tokenizer_path: a tokenizer.bin for llama2.c checkpoints ("" to look for tok<vocab>.bin / tokenizer.bin beside
// the model); for GGUF files a non-empty path replaces the embedded vocabulary. Throws si::Error naming the file;
// a vocabulary whose size differs from the model's is a format error naming both sizes.
ModelFile load_model_file(const std::string& path, const std::string& tokenizer_path = "");

// Loads only a vocabulary: from a GGUF (model or vocab-only) or a tokenizer.bin (all entries in the file).
Vocab load_vocab_file(const std::string& path);

}  // namespace si
