// Type declarations of cfqt for Node (index.js).
import type { Server } from 'http';

export interface TunnelOptions {
  /** Origin to expose: http://host:port, https://..., unix:/path. Omit to serve in-process. */
  url?: string;
  /** Serve cfqt's built-in hello-world origin. */
  helloWorld?: boolean;
  /** In-process: the http.Server whose request/upgrade events serve the tunnel (see listen()). */
  server?: Server;
  /** Quick-tunnel API (default https://api.trycloudflare.com). */
  quickService?: string;
  /** Edge addresses host:port (skips discovery). */
  edges?: string[];
  /** PEM file trusted alone for the edge's certificate. */
  edgeCaFile?: string;
  /** https:// origins: PEM file of roots trusted besides the system store. */
  originCaPool?: string;
  /** https:// origins: the name their certificate is checked against (default: the URL's host). */
  originServerName?: string;
  /** "auto" (default), "quic" or "http2". */
  protocol?: 'auto' | 'quic' | 'http2';
  /** debug, info (default), warn, error, fatal. */
  logLevel?: string;
  /** Serve /ready, /metrics, ... on metricsAddress (default off). */
  metrics?: boolean;
  metricsAddress?: string;
  /** 1..4, default 2. */
  haConnections?: number;
  /** Graceful shutdown: time requests get to finish (default 30000). */
  gracePeriodMs?: number;
  /** Reconnect backoff base (default 1000). */
  backoffBaseMs?: number;
  /** In-process requests served at once (default 64). */
  handlerThreads?: number;
  /** How long startTunnel() waits for the URL (default 30000). */
  urlTimeoutMs?: number;
}

export interface TunnelStatus {
  url: string;
  hostname: string;
  running: boolean;
  readyConnections: number;
}

export declare class Tunnel {
  /** The public URL, https://<words>.trycloudflare.com. */
  readonly url: string;
  readonly hostname: string;
  /** Resolves once an edge connection is registered; rejects after timeoutMs. */
  waitReady(timeoutMs?: number): Promise<void>;
  status(): TunnelStatus;
  /** The /metrics page (Prometheus text). */
  metrics(): string;
  /**
   * Serves the server's request (and upgrade) events in-process, with no socket:
   * server.listen() is never called. A request listener is wrapped in http.createServer().
   */
  listen<S extends Server>(server: S): S;
  listen(listener: (req: import('http').IncomingMessage,
                    res: import('http').ServerResponse) => void): Server;
  /** Graceful shutdown; resolves with the exit code (0 = clean). */
  close(): Promise<number>;
}

/** Starts a quick tunnel; resolves once its public URL is issued. */
export declare function startTunnel(options?: TunnelOptions): Promise<Tunnel>;
