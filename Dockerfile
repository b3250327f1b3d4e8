# Two stages so the runtime image carries neither the TypeScript toolchain nor
# the dev-only dependencies (embedded-postgres alone is hundreds of MB).

FROM node:20-bookworm-slim AS build
WORKDIR /app
# Manifests first: the dependency layer is reused until the lockfile changes.
COPY package.json package-lock.json ./
# No scripts: `prepare` builds, and the sources are not copied yet (next layer).
RUN npm ci --ignore-scripts
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
COPY migrations ./migrations
RUN npm run build

FROM node:20-bookworm-slim AS runtime
ENV NODE_ENV=production
WORKDIR /app
COPY package.json package-lock.json ./
# No runtime dependency has an install script; `prepare` (the build) is done.
RUN npm ci --omit=dev --ignore-scripts && npm cache clean --force
COPY --from=build /app/dist ./dist
# `pgembed` on the PATH: `docker compose exec worker pgembed status`.
RUN chmod +x dist/src/cli/pgembed.js && ln -s /app/dist/src/cli/pgembed.js /usr/local/bin/pgembed
# Without DATABASE_URL the CLIs fall back to embedded PGlite under ./.data;
# the non-root user must be able to create it.
RUN mkdir -p /app/.data && chown node:node /app/.data
USER node
# Exec form so node is PID 1 and receives SIGTERM directly: the embed job
# finishes its current batch and exits 143 instead of being killed mid-write.
CMD ["node", "dist/src/cli/pgembed.js", "embed"]
