import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';
import { oneLine } from '../errors.js';

/** Why the worker is not ready, or undefined when it is. */
export type ReadinessCheck = () => Promise<string | undefined>;

export interface ServiceServer {
  /** http://host:port, as bound (port 0 picks a free one). */
  readonly url: string;
  close(): Promise<void>;
}

// A probe that takes longer than this is a failed probe: kubelet's and
// compose's own timeouts are 1–30 s, and a scrape must not pile up behind a
// database that hangs.
const READY_TIMEOUT_MS = 5_000;

/**
 * /metrics (Prometheus text format), /healthz (the process answers) and
 * /readyz (200 when `ready` finds nothing wrong, else 503 with the reason
 * on one line). Nothing else: any other path is 404.
 */
export async function startServiceServer(options: {
  host: string;
  port: number;
  registry: Registry;
  ready: ReadinessCheck;
}): Promise<ServiceServer> {
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    const reply = (status: number, body: string, type = 'text/plain; charset=utf-8') => {
      res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
      res.end(body);
    };
    if (req.method !== 'GET' && req.method !== 'HEAD') return reply(405, 'method not allowed\n');
    if (path === '/healthz') return reply(200, 'ok\n');
    if (path === '/readyz') {
      void withTimeout(options.ready(), READY_TIMEOUT_MS).then(
        (problem) => (problem ? reply(503, `not ready: ${problem}\n`) : reply(200, 'ready\n')),
        (error: unknown) => reply(503, `not ready: ${oneLine(error)}\n`),
      );
      return;
    }
    if (path === '/metrics') {
      void options.registry.metrics().then(
        (text) => reply(200, text, options.registry.contentType),
        (error: unknown) => reply(500, `metrics failed: ${oneLine(error)}\n`),
      );
      return;
    }
    reply(404, 'not found: /metrics, /healthz, /readyz\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { address, port } = server.address() as AddressInfo;
  const host = address.includes(':') ? `[${address}]` : address;
  return {
    url: `http://${host}:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
    timer.unref();
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}
