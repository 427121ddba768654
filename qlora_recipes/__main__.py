import sys

from qlora_recipes.cli import main

sys.exit(main())
