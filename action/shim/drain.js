'use strict';
require('./run').run('drain');
