import type {
  KyselyPlugin,
  OperationNode,
  QueryResult,
  RawNode,
  RootOperationNode,
  UnknownRow,
} from 'kysely';

/**
 * A Kysely plugin that hands the result of each query `matches` picks to
 * `hook`, which may pass it on, wait first, or throw as a lost connection
 * would. For tests that must act at an exact point of the worker's own
 * queries, on either backend, without touching the database or the code.
 */
export function queryHook(
  matches: (node: RootOperationNode) => boolean,
  hook: (result: QueryResult<UnknownRow>) => Promise<QueryResult<UnknownRow>>,
): KyselyPlugin {
  const picked = new WeakSet<object>();
  return {
    transformQuery(args) {
      if (matches(args.node)) picked.add(args.queryId);
      return args.node;
    },
    async transformResult(args) {
      return picked.has(args.queryId) ? hook(args.result) : args.result;
    },
  };
}

/** Matches a raw `sql` statement whose text includes `text`, in a nested `sql` part too. */
export const rawSqlIncludes =
  (text: string) =>
  (node: RootOperationNode): boolean =>
    node.kind === 'RawNode' && rawText(node).includes(text);

/** A raw statement's own text and that of the raw parts within it. */
function rawText(node: OperationNode): string {
  if (node.kind !== 'RawNode') return '';
  const raw = node as RawNode;
  return raw.sqlFragments.join('') + raw.parameters.map(rawText).join('');
}

/**
 * A Kysely plugin that explains, instead of running, each raw statement
 * `matches` picks ("explain " put before its text), keeps the plan in
 * `plans`, and answers the caller with `standIn` rows.
 */
export function explainInstead(
  matches: (node: RootOperationNode) => boolean,
  standIn: UnknownRow[],
): { plugin: KyselyPlugin; plans: string[] } {
  const plans: string[] = [];
  const picked = new WeakSet<object>();
  const plugin: KyselyPlugin = {
    transformQuery(args) {
      if (args.node.kind !== 'RawNode' || !matches(args.node)) return args.node;
      picked.add(args.queryId);
      const [first = '', ...rest] = (args.node as RawNode).sqlFragments;
      return { ...args.node, sqlFragments: [`explain ${first}`, ...rest] } as RawNode;
    },
    async transformResult(args) {
      if (!picked.has(args.queryId)) return args.result;
      plans.push(args.result.rows.map((r) => String(Object.values(r)[0])).join('\n'));
      return { rows: standIn };
    },
  };
  return { plugin, plans };
}
