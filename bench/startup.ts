/**
 * npm run bench -- --only startup
 *
 * How long `pgembed` takes to answer, from spawn to exit, and its peak
 * memory (maxRSS, written by bench/peak-rss.mjs as the process exits): the
 * built binary as `npm ci` links it, against the same through tsx and
 * through `npm run`. Each figure is the median of `runs` (after one run
 * that is not counted, so the OS's file cache is warm).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { builtBinary, childEnv, repoRoot } from '../test/support/cli.js';

const peakRss = fileURLToPath(new URL('./peak-rss.mjs', import.meta.url));

export interface StartupFigure {
  what: string;
  median_s: number;
  min_s: number;
  peak_rss_mib: number;
  runs: number;
}

interface Context {
  serverUrl: string;
  fakeUrl: string;
  log: (text: string) => void;
  row: (...cells: Array<string | number>) => void;
  results: Record<string, unknown>;
}

function measure(
  what: string,
  command: string,
  args: string[],
  options: {
    env?: Record<string, string>;
    runs?: number;
    /** false: every run counts (a first start cannot be repeated warm). */
    warm?: boolean;
    expectCode?: number;
  } = {},
): StartupFigure {
  const scratch = mkdtempSync(join(tmpdir(), 'pgembed-startup-'));
  const runs = options.runs ?? 7;
  const times: number[] = [];
  const peaks: number[] = [];
  try {
    for (let i = options.warm === false ? 1 : 0; i <= runs; i++) {
      const rssFile = join(scratch, `rss-${i}`);
      const started = process.hrtime.bigint();
      const child = spawnSync(command, args, {
        cwd: repoRoot,
        env: childEnv({
          ...options.env,
          PGEMBED_PEAK_RSS_FILE: rssFile,
          NODE_OPTIONS: `--import ${peakRss}`,
        }),
        encoding: 'utf8',
      });
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      if (child.status !== (options.expectCode ?? 0)) {
        throw new Error(`${what}: exit ${child.status}: ${child.stderr.split('\n')[0]}`);
      }
      if (i === 0) continue; // warm-up
      times.push(seconds);
      // npm's own node process writes too: the largest is the command's.
      const kib = readFileSync(rssFile, 'utf8').split('\n').filter(Boolean).map(Number);
      peaks.push(Math.max(...kib) / 1024);
    }
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
  const sorted = [...times].sort((a, b) => a - b);
  return {
    what,
    median_s: sorted[Math.floor(sorted.length / 2)] as number,
    min_s: sorted[0] as number,
    peak_rss_mib: Math.max(...peaks),
    runs: times.length,
  };
}

export async function startupBench(context: Context): Promise<void> {
  const { serverUrl, fakeUrl, log, row, results } = context;
  const database = `pgembed_bench_startup_${process.pid}`;
  const postgres = new URL(serverUrl);
  postgres.pathname = `/${database}`;
  const admin = (sql: string) =>
    spawnSync('psql', [serverUrl, '-qc', sql], { encoding: 'utf8', env: process.env });
  admin(`drop database if exists ${database}`);
  admin(`create database ${database}`);
  const pgliteDir = mkdtempSync(join(tmpdir(), 'pgembed-startup-pglite-'));
  const figures: StartupFigure[] = [];
  const add = (figure: StartupFigure, goal?: string) => {
    figures.push(figure);
    log(`startup: ${JSON.stringify(figure)}`);
    row(
      '0 start-up',
      '',
      figure.what,
      `${figure.median_s.toFixed(2)} s`,
      `${goal ? `goal ${goal}; ` : ''}${Math.round(figure.peak_rss_mib)} MiB peak`,
    );
  };
  const openai = { OPENAI_BASE_URL: fakeUrl, OPENAI_API_KEY: 'sk-bench' };
  try {
    add(measure('pgembed --help', process.execPath, [builtBinary, '--help']), '≤ 0.3 s');
    add(measure('pgembed status --help', process.execPath, [builtBinary, 'status', '--help']));
    add(
      measure('pgembed --help through tsx (the sources)', process.execPath, [
        '--import',
        'tsx',
        join(repoRoot, 'src', 'cli', 'pgembed.ts'),
        '--help',
      ]),
    );
    add(
      measure('npm run status -- --help (npm, then pgembed)', 'npm', [
        'run',
        'status',
        '--',
        '--help',
      ]),
    );
    const pg = { DATABASE_URL: postgres.toString() };
    add(
      measure(
        'pgembed status, Postgres, no tables yet (exit 1)',
        process.execPath,
        [builtBinary, 'status'],
        {
          env: pg,
          expectCode: 1,
        },
      ),
    );
    // The embed below migrates the database: status then has tables to read.
    add(
      measure('pgembed embed, Postgres, nothing to do', process.execPath, [builtBinary, 'embed'], {
        env: { ...pg, ...openai },
      }),
    );
    add(
      measure('pgembed status, Postgres, empty', process.execPath, [builtBinary, 'status'], {
        env: pg,
      }),
      '≤ 0.6 s',
    );
    const pglite = { DATABASE_URL: `pglite:${pgliteDir}` };
    add(
      measure(
        'pgembed embed, PGlite, first start (initdb)',
        process.execPath,
        [builtBinary, 'embed'],
        {
          env: { ...pglite, ...openai },
          runs: 1,
          warm: false,
        },
      ),
    );
    add(
      measure('pgembed embed, PGlite, nothing to do', process.execPath, [builtBinary, 'embed'], {
        env: { ...pglite, ...openai },
        runs: 5,
      }),
    );
    add(
      measure(
        'pgembed embed, PGlite, nothing to do, local model',
        process.execPath,
        [builtBinary, 'embed'],
        { env: pglite, runs: 5 },
      ),
    );
    add(
      measure('pgembed status, PGlite, empty', process.execPath, [builtBinary, 'status'], {
        env: pglite,
        runs: 5,
      }),
    );
    const engineOnly = join(pgliteDir, 'engine-only');
    for (const [what, runs] of [
      ['PGlite.create alone, first start (initdb)', 1],
      ['PGlite.create alone, existing directory', 5],
    ] as const) {
      add(
        measure(
          what,
          process.execPath,
          [
            '--input-type=module',
            '-e',
            [
              "const { PGlite } = await import('@electric-sql/pglite');",
              "const { vector } = await import('@electric-sql/pglite-pgvector');",
              `const db = await PGlite.create(${JSON.stringify(engineOnly)}, { extensions: { vector } });`,
              "await db.query('select 1');",
              'await db.close();',
            ].join('\n'),
          ],
          { runs, warm: false },
        ),
      );
    }
    add(measure('node -e 0 (the floor)', process.execPath, ['-e', '0']));
  } finally {
    results.startup = figures;
    rmSync(pgliteDir, { recursive: true, force: true });
    admin(`drop database if exists ${database}`);
  }
}
