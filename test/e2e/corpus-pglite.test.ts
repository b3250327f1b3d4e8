import { corpusScenarios } from './corpus-scenarios.js';

corpusScenarios('pglite');
