from sft_dist.cli import main

raise SystemExit(main())
