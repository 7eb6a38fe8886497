#pragma once
// A QUIC bidirectional stream as a kj::AsyncIoStream.

#include <kj/async-io.h>

#include <stdint.h>

namespace cfqt::quic {

class Stream: public kj::AsyncIoStream {
  // One bidirectional QUIC stream. Created by Connection::openStream()/acceptStream(); lives on
  // the connection's thread. May outlive its Connection handle: once the connection is gone every
  // operation fails with the connection's close exception.
  //
  // Reading: tryRead() returns buffered bytes; flow-control credit is returned to the peer only
  // as bytes are consumed here, so a reader that stops reading halts the peer's writer after the
  // stream window. 0 = the peer's FIN. A peer RESET_STREAM makes reads throw DISCONNECTED.
  //
  // Writing: write() copies the bytes into the stream's send buffer, which keeps them until the
  // peer acknowledges them; the promise resolves once all bytes are in the buffer. The buffer
  // holds at most TransportConfig::streamSendBuffer bytes not yet sent (so a write waits while
  // the peer withholds credit) and the connection's send budget bounds all streams together
  // (connectionSendHigh/Low, streamSendReserve). One write and one read may be in flight at a
  // time. A peer STOP_SENDING makes writes throw DISCONNECTED.
  //
  // Dropping the Stream: a write side without FIN is reset (RESET_STREAM, code 0); an unfinished
  // read side gets STOP_SENDING (code 0) and its buffered bytes are credited back. Data already
  // FIN-ished is still delivered and retransmitted until acknowledged.
public:
  virtual int64_t id() const = 0;
  // The QUIC stream ID (client-opened bidi: 0, 4, 8, ...; server-opened: 1, 5, 9, ...).

  virtual void reset(uint64_t appErrorCode) = 0;
  // Abort the write side: RESET_STREAM with `appErrorCode`; pending and later writes fail.

  virtual void stopSending(uint64_t appErrorCode) = 0;
  // Abort the read side: STOP_SENDING with `appErrorCode`; buffered bytes are discarded (and
  // credited back to the connection); later reads fail DISCONNECTED.

  virtual void setCreditWithheld(bool withheld) = 0;
  // Fault injection (emulator): while true, bytes consumed by tryRead() are not credited back to
  // the peer (neither stream nor connection window), so the peer's writer stalls once the window
  // is used up. Setting it back to false releases all the withheld credit at once.

  virtual uint64_t bufferedReadBytes() const = 0;
  // Received bytes held for this stream, not yet consumed by tryRead(). Never exceeds the
  // stream's receive window.

  virtual uint64_t bufferedWriteBytes() const = 0;
  // Written bytes held for this stream until acknowledged: at most streamSendBuffer not yet
  // sent, plus those in flight.

  virtual size_t writableBytes(size_t wanted) = 0;
  virtual kj::Promise<void> whenWritable() = 0;
  // Flow control for writers that should not hold bytes the stream cannot take (a proxy's pump
  // buffer). writableBytes() returns how many bytes, at most `wanted`, the next write() takes
  // at once, and reserves them in the connection's send budget until that write (or the next
  // call, or the stream's end), so a writer that first reads that much from elsewhere never
  // waits with it. It returns 0 while the stream could take less than `wanted` and less than
  // TransportConfig::streamSendReserve (it waits for the peer's credit, acknowledgements or the
  // connection's send budget), and kj::maxValue once a write would fail at once (it then
  // throws). whenWritable() resolves once at least streamSendReserve bytes could be taken, or
  // the write side failed (never rejects); not to be called while a write is pending.

  virtual kj::Promise<void> whenAborted() = 0;
  // Resolves (never rejects) once the stream was abandoned before it completed: the peer reset
  // its sending side (RESET_STREAM), the stream ended before our FIN was acknowledged (the
  // peer's STOP_SENDING, or our own reset), a write failed, or the connection ended. This is how
  // a proxy learns that the requester went away while it waits on someone else. Cheap: nothing
  // is polled. Many waiters ok.

  // kj::AsyncIoStream
  //   shutdownWrite(): FIN after the buffered bytes.
  //   abortRead(): STOP_SENDING with code 0 (same as stopSending(0)).
  //   pumpTo()/tryPumpFrom() are overridden with large buffers.
};

}  // namespace cfqt::quic
