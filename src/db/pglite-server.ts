import { existsSync, mkdtempSync, rmSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { PGlite } from '@electric-sql/pglite';
import { PGLiteSocketHandler } from '@electric-sql/pglite-socket';
import type { ServeAddress } from './pglite-lock.js';
import type { PGliteSession } from './pglite-session.js';

// sun_path holds 108 bytes on Linux and 104 on macOS, with the closing NUL.
const MAX_SOCKET_PATH_BYTES = 103;
const SOCKET_PORT = 5432;
// Every `--db-pool-size` of every client process, with room to spare.
const MAX_CLIENTS = 256;
// ReadyForQuery: 'Z', length 5, then the transaction status ('I' idle).
const READY_FOR_QUERY = [0x5a, 0, 0, 0, 5] as const;
const IDLE = 0x49;
const SYNC = new Uint8Array([0x53, 0, 0, 0, 4]);
const STARTUP = startupPacket({ user: 'postgres', database: 'postgres' });
// The frontend messages a client may send after startup. PGlite runs a
// message synchronously, and one of a type it does not know ('z', say) spins
// forever inside that call: the holder's event loop stops, signals included.
const FRONTEND_TYPES = new Set('QPBDECHSFdcf');
const TERMINATE = 'X'.charCodeAt(0);
/**
 * How long a client may keep the one session while it sends nothing: a
 * transaction left open in psql, or a Parse without its Sync. pgembed's own
 * transactions send their statements back to back; 30 s is far beyond them,
 * and far below the 30 s lease of a run whose commits queue behind it.
 */
export const CLIENT_HOLD_IDLE_MS = 30_000;

export interface ServerOptions {
  /** One line for a person: a client closed for holding the session too long. */
  notice: (message: string) => void;
  /** How long a client may hold the session idle before it is closed (tests shorten it). */
  holdIdleMs?: number;
}

/**
 * Serves this process's PGlite to other processes on a unix socket in the
 * data directory (`psql -h DIR`), or, where that path is too long for a
 * socket, in a private directory of its own (mode 0700). Never on a network
 * address: a socket file's permissions are the only access control PGlite has.
 *
 * pglite-socket's handler does the wire framing (startup, SSL and cancel
 * requests). Its own multiplexer lets a client's statement run inside a
 * transaction of this process's Kysely driver, so the queue here is ours: a
 * client takes the shared PGliteSession with its first message and gives it
 * back only when the backend says it is idle again (ReadyForQuery 'I'), which
 * is the end of its transaction or of its one statement.
 */
export class PGliteServer {
  readonly #clients = new Set<Socket>();
  #idleWaiters: (() => void)[] = [];
  #stopped = false;
  #address: ServeAddress | undefined;
  #privateDir: string | undefined;

  private constructor(private readonly server: Server) {}

  static async start(
    pglite: PGlite,
    session: PGliteSession,
    dir: string,
    options: ServerOptions,
  ): Promise<PGliteServer> {
    const queue = new SessionQueue(pglite, session, options);
    const server = createServer();
    const self = new PGliteServer(server);
    server.on('connection', (socket) => {
      const handler = new PGLiteSocketHandler({
        // The handler takes any object with the queue's three methods.
        queryQueue: queue as never,
        closeOnDetach: true,
      });
      const id = handler.handlerId;
      self.#clients.add(socket);
      queue.track(id, socket);
      // The handler's events, not the socket's: on an error it removes every
      // 'close' listener from the socket before it destroys it.
      const gone = () => {
        queue.untrack(id);
        if (self.#clients.delete(socket) && self.#clients.size === 0) self.#wakeIdle();
      };
      handler.addEventListener('close', gone, { once: true });
      handler.addEventListener('error', gone, { once: true });
      handler.attach(socket).catch(() => {
        gone();
        socket.destroy();
      });
    });
    server.maxConnections = MAX_CLIENTS;
    // An accept error (EMFILE) must not take the holder down.
    server.on('error', (error) => options.notice(`serving the database: ${error.message}`));
    let socketDir = dir;
    if (Buffer.byteLength(join(dir, `.s.PGSQL.${SOCKET_PORT}`)) > MAX_SOCKET_PATH_BYTES) {
      self.#privateDir = mkdtempSync(join(tmpdir(), 'pgembed-'));
      socketDir = self.#privateDir;
    }
    const socketPath = join(socketDir, `.s.PGSQL.${SOCKET_PORT}`);
    // We hold the directory's lock, so a socket file here is a dead holder's.
    if (existsSync(socketPath)) unlinkSync(socketPath);
    await listen(server, socketPath);
    self.#address = { socketDir, port: SOCKET_PORT };
    return self;
  }

  get address(): ServeAddress {
    if (!this.#address) throw new Error('not listening');
    return this.#address;
  }

  get clients(): number {
    return this.#clients.size;
  }

  /** Resolves once no client is connected. */
  whenIdle(): Promise<void> {
    if (this.#clients.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** Closes the listener and every client connection; safe to call twice. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const socket of this.#clients) socket.destroy();
    await closed;
    if (this.#privateDir) rmSync(this.#privateDir, { recursive: true, force: true });
    this.#wakeIdle();
  }

  #wakeIdle(): void {
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of waiters) wake();
  }
}

/**
 * What pglite-socket's handler calls for each protocol message of one
 * client (its `handlerId`), in the shape of its own queue.
 */
class SessionQueue {
  /** The release of the session, for the client that holds it. */
  readonly #holding = new Map<number, () => void>();
  /** Clients that sent extended-protocol messages the backend has not yet closed with a Sync. */
  readonly #midExchange = new Set<number>();
  /** Each client's messages run in order, one at a time. */
  readonly #chains = new Map<number, Promise<unknown>>();
  readonly #gone = new Set<number>();
  readonly #sockets = new Map<number, Socket>();
  /** A client that holds the session and sends nothing is closed when this fires. */
  readonly #idleTimers = new Map<number, NodeJS.Timeout>();

  constructor(
    private readonly pglite: PGlite,
    private readonly session: PGliteSession,
    private readonly options: ServerOptions,
  ) {}

  track(handlerId: number, socket: Socket): void {
    this.#sockets.set(handlerId, socket);
  }

  untrack(handlerId: number): void {
    this.#sockets.delete(handlerId);
  }

  enqueue(handlerId: number, message: Uint8Array, onData: (data: Uint8Array) => void) {
    this.#clearIdleTimer(handlerId);
    const previous = this.#chains.get(handlerId) ?? Promise.resolve();
    const run = previous
      .catch(() => {})
      .then(() => this.#run(handlerId, message, onData))
      .finally(() => this.#startIdleTimer(handlerId));
    this.#chains.set(handlerId, run);
    return run;
  }

  async #run(handlerId: number, message: Uint8Array, onData: (data: Uint8Array) => void) {
    if (this.#gone.has(handlerId)) throw new Error('client disconnected');
    const type = message[0] ?? 0;
    if (type === TERMINATE) return 0; // the socket closes next
    if (type === 0) {
      // A startup packet is the only message whose first byte is 0 (its
      // length's high byte). PGlite has one user and one database whatever it
      // names, but a packet without a user is FATAL, and a FATAL at startup
      // leaves the one backend unusable for everyone (seen: "cannot drop
      // active portal" in the holder's next statement). Options in it (-c
      // settings) would change the session everyone shares. So every client
      // starts the same.
      message = STARTUP;
    } else if (!FRONTEND_TYPES.has(String.fromCharCode(type))) {
      onData(errorResponse('08P01', `invalid frontend message type ${type}`));
      throw new Error('invalid frontend message'); // the handler closes the client
    }
    if (!this.#holding.has(handlerId)) {
      const release = await this.session.acquire(handlerId);
      if (this.#gone.has(handlerId)) {
        release();
        throw new Error('client disconnected');
      }
      this.#holding.set(handlerId, release);
    }
    // Parse, Bind, Describe, Execute, Close, Flush: an exchange only Sync ends.
    if ('PBDECH'.includes(String.fromCharCode(type))) this.#midExchange.add(handlerId);
    let bytes = 0;
    let tail: number[] = [];
    await this.pglite.runExclusive(() =>
      this.pglite.execProtocolRawStream(message, {
        onRawData: (data) => {
          bytes += data.length;
          tail = [...tail, ...data.subarray(Math.max(0, data.length - 6))].slice(-6);
          onData(data);
        },
      }),
    );
    if (tail.length === 6 && READY_FOR_QUERY.every((b, i) => tail[i] === b)) {
      this.#midExchange.delete(handlerId);
      if (tail[5] === IDLE) {
        this.#holding.get(handlerId)?.();
        this.#holding.delete(handlerId);
      }
    }
    return bytes;
  }

  #startIdleTimer(handlerId: number): void {
    if (!this.#holding.has(handlerId) || this.#gone.has(handlerId)) return;
    const holdIdleMs = this.options.holdIdleMs ?? CLIENT_HOLD_IDLE_MS;
    const timer = setTimeout(() => {
      this.options.notice(
        `closed a client that kept the embedded database in an open transaction for ${holdIdleMs / 1000} s without a statement; its transaction was rolled back`,
      );
      this.#sockets.get(handlerId)?.destroy();
    }, holdIdleMs);
    timer.unref();
    this.#idleTimers.set(handlerId, timer);
  }

  #clearIdleTimer(handlerId: number): void {
    clearTimeout(this.#idleTimers.get(handlerId));
    this.#idleTimers.delete(handlerId);
  }

  clearQueueForHandler(handlerId: number): void {
    this.#gone.add(handlerId);
    this.#clearIdleTimer(handlerId);
  }

  /**
   * A client went away: end what it left open, then give the session back.
   * Never throws: the handler calls it from a socket's close event, and
   * nothing a client did may take the holder down.
   */
  async clearTransactionIfNeeded(handlerId: number): Promise<void> {
    await this.#chains.get(handlerId)?.catch(() => {});
    this.#chains.delete(handlerId);
    this.#gone.delete(handlerId);
    this.#clearIdleTimer(handlerId);
    const midExchange = this.#midExchange.delete(handlerId);
    const release = this.#holding.get(handlerId);
    if (!release) return;
    this.#holding.delete(handlerId);
    try {
      if (midExchange) await this.pglite.runExclusive(() => this.pglite.execProtocolRaw(SYNC));
      if (this.pglite.isInTransaction()) await this.pglite.exec('rollback');
    } catch {
      // The backend reports the error to no one; the next statement starts clean.
    } finally {
      release();
    }
  }
}

/** An ErrorResponse message: severity, code and message fields. */
function errorResponse(code: string, message: string): Uint8Array {
  const fields = Buffer.from(`SFATAL\0VFATAL\0C${code}\0M${message}\0\0`);
  const out = Buffer.alloc(5 + fields.length);
  out.write('E', 0);
  out.writeInt32BE(4 + fields.length, 1);
  fields.copy(out, 5);
  return new Uint8Array(out);
}

function startupPacket(parameters: Record<string, string>): Uint8Array {
  const body = Buffer.from(
    `${Object.entries(parameters)
      .map(([key, value]) => `${key}\0${value}\0`)
      .join('')}\0`,
  );
  const packet = Buffer.alloc(8 + body.length);
  packet.writeInt32BE(packet.length, 0);
  packet.writeInt32BE(196608, 4); // protocol 3.0
  body.copy(packet, 8);
  return new Uint8Array(packet);
}

function listen(server: Server, path: string) {
  return new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolve();
    });
  });
}
