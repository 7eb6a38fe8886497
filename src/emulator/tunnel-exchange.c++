#include "tunnel-exchange.h"

#include "wire/data-stream.h"

#include <capnp/message.h>

namespace cfqt::emulator {

namespace {

class QuicExchange final: public TunnelExchange {
public:
  explicit QuicExchange(kj::Own<kj::AsyncIoStream> innerParam): inner(kj::mv(innerParam)) {}
  KJ_DISALLOW_COPY(QuicExchange);

  kj::Promise<void> sendHead(const wire::HttpRequestHead& head) override {
    capnp::MallocMessageBuilder message;
    auto root = message.initRoot<wire::schema::ConnectRequest>();
    wire::encodeRequest(root, head);
    // writeConnectRequest() encodes synchronously; the promise owns the bytes.
    return wire::writeConnectRequest(*inner, root.asReader());
  }

  kj::Promise<kj::OneOf<wire::HttpResponseHead, wire::WireError>> readResponseHead() override {
    return wire::readConnectResponse(*inner).then([](kj::Own<capnp::MessageReader> message) {
      return wire::decodeResponse(message->getRoot<wire::schema::ConnectResponse>());
    });
  }

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return inner->tryRead(buffer, minBytes, maxBytes);
  }
  kj::Promise<uint64_t> pumpTo(kj::AsyncOutputStream& output, uint64_t amount) override {
    return inner->pumpTo(output, amount);
  }
  kj::Promise<void> write(const void* buffer, size_t size) override {
    return inner->write(buffer, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner->write(pieces);
  }
  kj::Maybe<kj::Promise<uint64_t>> tryPumpFrom(kj::AsyncInputStream& input,
                                               uint64_t amount) override {
    return inner->tryPumpFrom(input, amount);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner->whenWriteDisconnected(); }
  void shutdownWrite() override { inner->shutdownWrite(); }
  void abortRead() override { inner->abortRead(); }

private:
  kj::Own<kj::AsyncIoStream> inner;
};

}  // namespace

kj::Own<TunnelExchange> quicExchange(kj::Own<kj::AsyncIoStream> stream) {
  return kj::heap<QuicExchange>(kj::mv(stream));
}

}  // namespace cfqt::emulator
